"""What Forge fetches the first time a feature is used, and where it looks for each file.

One table, read from Forge's source at ``FORGE_COMMIT`` (its ``load_file_from_url``, ``load_models``,
``torch.hub`` and ``clip.load`` calls and the folders they are given). A spec turns features on
(``[forge] features = ["previews", "upscale:R-ESRGAN 4x+"]``); ``lock`` pins each of their files
(URL, sha256, size), ``install`` puts it where Forge looks, so a worker never downloads at run time.

Folders are relative to the volume's ``models/`` (Forge's ``--models-dir``): Forge's defaults for
them all fall there, except CLIP's (``~/.cache/clip``), which the worker points at
``models/CLIP`` with Forge's own ``--clip-models-path`` (``FLAGS``).

``CALL_SITES`` lists every file of Forge's tree that has a first-use download call, how many, and
which feature covers it (or why none need to); ``scan_forge_source`` finds them, and a test on the
lab fails when Forge has one this table does not know.

To add a feature: read the call in Forge's source, add its files (URL, the folder Forge passes and
the file name it looks for) to ``FEATURES``, and its file to ``CALL_SITES``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Upstream stable-diffusion-webui-forge commit the table was read from (the lab's forge-src).
FORGE_COMMIT = "dfdcbab685e57677014f05a3309b48cc87383167"


@dataclass(frozen=True)
class FirstUseFile:
    url: str  # what Forge fetches
    folder: str  # where Forge looks, relative to the volume's models/ ("VAE-approx", "insightface/models/antelopev2")
    name: str  # the file name Forge looks for in it
    read_from: str  # the file of Forge's source with the call
    sha256: str | None = None  # when known (CLIP's URL carries it; clip.load checks it)

    @property
    def path(self) -> str:
        """Relative to the volume's root, as the lock and state.json record it."""
        return f"models/{self.folder}/{self.name}"


@dataclass(frozen=True)
class Feature:
    name: str
    summary: str
    files: tuple[FirstUseFile, ...] = ()  # fetched whichever choices are made
    choices: Mapping[str, tuple[FirstUseFile, ...]] = field(default_factory=dict)  # name:CHOICE[,CHOICE...]
    default_choices: tuple[str, ...] | None = None  # None: choices are required ("upscale:R-ESRGAN 4x+")

    def files_for(self, chosen: tuple[str, ...]) -> tuple[FirstUseFile, ...]:
        out = list(self.files)
        for choice in chosen:
            out += [f for f in self.choices[choice] if f not in out]
        return tuple(out)


def _f(url: str, folder: str, read_from: str, name: str | None = None, sha256: str | None = None) -> FirstUseFile:
    return FirstUseFile(url, folder, name or url.rsplit("/", 1)[-1], read_from, sha256)


_A1111_PRE = "https://github.com/AUTOMATIC1111/stable-diffusion-webui/releases/download/v1.0.0-pre/"
_TAESD = "https://github.com/madebyollin/taesd/raw/main/"
_ANNOTATORS = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"
_CN_CKPTS = "https://huggingface.co/lllyasviel/ControlNet/resolve/main/annotator/ckpts/"
_LLLITE = "https://huggingface.co/bdsqlsz/qinglong_controlnet-lllite/resolve/main/Annotators/"
_RESRGAN = "https://github.com/xinntao/Real-ESRGAN/releases/download/"
_DAT = "https://huggingface.co/w-e-w/DAT/resolve/main/experiments/pretrained_models/DAT/"
_ANTELOPE = "https://huggingface.co/DIAMONIK7777/antelopev2/resolve/main/"
_IPA = "https://huggingface.co/h94/IP-Adapter/resolve/main/"
_LEGACY = "extensions-builtin/forge_legacy_preprocessors/annotator/"
_CNP = "controlnet-preprocessors:"
_SUPPORTED = "extensions-builtin/sd_forge_ipadapter/scripts/forge_ipadapter.py"  # the call: supported_preprocessor.py
_CLIP_CATEGORIES = "https://raw.githubusercontent.com/pharmapsychotic/clip-interrogator/main/clip_interrogator/data/"

# Forge's Hugging Face cache: models/diffusers (Forge's diffusers_dir; modules_forge/initialization.py points
# HF_HUB_CACHE there, but only after transformers has read it, so the worker sets it from the start).
HF_HUB_FOLDER = "diffusers"
# What transformers and diffusers write into the cache at import when missing ("1" each): install writes
# them, so a worker never writes to the volume.
HF_CACHE_MARKERS = {"version.txt": "1", "version_diffusers_cache.txt": "1"}
# bert-base-uncased's revision on the Hub (its refs/main). transformers offline finds a file through
# refs/main -> snapshots/<revision>/; the files are fetched from resolve/main, pinned by their sha256.
BERT_REVISION = "86b5e0934494bd15c9632b12f734a8a67f723594"

_FACEXLIB = (  # facexlib's face detector and parser: Forge points facexlib's downloads at the GFPGAN folder
    _f("https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth", "GFPGAN",
       "modules/face_restoration_utils.py"),
    _f("https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth", "GFPGAN",
       "modules/face_restoration_utils.py"),
)


def _hf_cached(repo: str, revision: str, name: str, read_from: str) -> FirstUseFile:
    """A file transformers loads by repository id, in the Hugging Face cache's layout under HF_HUB_FOLDER."""
    return _f(f"https://huggingface.co/{repo}/resolve/main/{name}",
              f"{HF_HUB_FOLDER}/models--{repo.replace('/', '--')}/snapshots/{revision}", read_from)


def _resrgan(version: str, name: str) -> tuple[FirstUseFile, ...]:
    return (_f(f"{_RESRGAN}{version}/{name}", "RealESRGAN", "modules/realesrgan_model.py"),)


def _dat(scale: int) -> tuple[FirstUseFile, ...]:
    return (_f(f"{_DAT}DAT_x{scale}.pth", "DAT", "modules/dat_model.py"),)


def _pre(folder: str, url: str, read_from: str, name: str | None = None) -> FirstUseFile:
    """A ControlNet preprocessor's file: in ``models/ControlNetPreprocessor`` (Forge's preprocessor_dir)."""
    return _f(url, f"ControlNetPreprocessor/{folder}" if folder else "ControlNetPreprocessor", read_from, name)


_SCUNET = (  # Forge fetches the GAN weights for both choices, named after the upscaler
    _f("https://github.com/cszn/KAIR/releases/download/v1.0/scunet_color_real_gan.pth", "ScuNET",
       "extensions-builtin/ScuNET/scripts/scunet_model.py", name="ScuNET.pth"),
)

FEATURES: dict[str, Feature] = {f.name: f for f in (
    Feature("previews", "live previews (GET /sdapi/v1/progress's current_image): the VAE-approx and TAESD decoders", (
        *(_f(_A1111_PRE + n, "VAE-approx", "modules/sd_vae_approx.py")
          for n in ("model.pt", "vaeapprox-sdxl.pt", "vaeapprox-sd3.pt")),
        *(_f(_TAESD + n, "VAE-taesd", "modules/sd_vae_taesd.py")
          for n in ("taesd_decoder.pth", "taesdxl_decoder.pth", "taesd3_decoder.pth", "taef1_decoder.pth")),
    )),
    Feature("taesd-encode", "TAESD encoders (the 'TAESD' VAE encode method)", tuple(
        _f(_TAESD + n, "VAE-taesd", "modules/sd_vae_taesd.py")
        for n in ("taesd_encoder.pth", "taesdxl_encoder.pth", "taesd3_encoder.pth", "taef1_encoder.pth"))),
    Feature("face-restore", "face restoration (GFPGAN, CodeFormer) with facexlib's detector and parser", choices={
        "gfpgan": (_f("https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth", "GFPGAN",
                      "modules/gfpgan_model.py"), *_FACEXLIB),
        "codeformer": (_f("https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth", "Codeformer",
                          "modules/codeformer_model.py", name="codeformer-v0.1.0.pth"), *_FACEXLIB),
    }, default_choices=("gfpgan", "codeformer")),
    Feature("upscale", "Forge's built-in upscalers, by the name Forge lists them under", choices={
        "ESRGAN_4x": (_f("https://github.com/cszn/KAIR/releases/download/v1.0/ESRGAN.pth", "ESRGAN",
                         "modules/esrgan_model.py", name="ESRGAN_4x.pth"),),
        "R-ESRGAN General 4xV3": _resrgan("v0.2.5.0", "realesr-general-x4v3.pth"),
        "R-ESRGAN General WDN 4xV3": _resrgan("v0.2.5.0", "realesr-general-wdn-x4v3.pth"),
        "R-ESRGAN AnimeVideo": _resrgan("v0.2.5.0", "realesr-animevideov3.pth"),
        "R-ESRGAN 4x+": _resrgan("v0.1.0", "RealESRGAN_x4plus.pth"),
        "R-ESRGAN 4x+ Anime6B": _resrgan("v0.2.2.4", "RealESRGAN_x4plus_anime_6B.pth"),
        "R-ESRGAN 2x+": _resrgan("v0.2.1", "RealESRGAN_x2plus.pth"),
        "DAT x2": _dat(2), "DAT x3": _dat(3), "DAT x4": _dat(4),
        "ScuNET GAN": _SCUNET, "ScuNET PSNR": _SCUNET,
        "SwinIR 4x": (_f("https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/"
                         "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth", "SwinIR",
                         "extensions-builtin/SwinIR/scripts/swinir_model.py", name="SwinIR_4x.pth"),),
    }),
    Feature("interrogate", "POST /sdapi/v1/interrogate with model clip: BLIP's captioner, CLIP ViT-L/14 (in "
            "models/CLIP, with --clip-models-path), the CLIP interrogator's category lists and BLIP's tokenizer "
            "(bert-base-uncased, in the Hugging Face cache in models/diffusers)", (
        _f("https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_caption_capfilt_large.pth",
           "BLIP", "modules/interrogate.py"),
        _f("https://openaipublic.azureedge.net/clip/models/"
           "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt", "CLIP",
           "modules/interrogate.py", sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
        # Forge reads these from interrogate/ in its working folder: install links the checkout's
        # interrogate/ to models/interrogate (INTERROGATE_LINK).
        *(_f(_CLIP_CATEGORIES + f"{c}.txt", "interrogate", "modules/interrogate.py")
          for c in ("artists", "flavors", "mediums", "movements")),
        # BLIP's tokenizer: BertTokenizer.from_pretrained('bert-base-uncased') reads these from the HF cache.
        *(_hf_cached("bert-base-uncased", BERT_REVISION, n, "repositories/BLIP/models/blip.py")
          for n in ("vocab.txt", "tokenizer_config.json", "config.json")),
    )),
    Feature("deepbooru", "POST /sdapi/v1/interrogate with model deepdanbooru", (
        _f("https://github.com/AUTOMATIC1111/TorchDeepDanbooru/releases/download/v1/model-resnet_custom_v3.pt",
           "torch_deepdanbooru", "modules/deepbooru.py"),
    )),
    Feature("controlnet-preprocessors", "ControlNet preprocessors' annotator models (models/ControlNetPreprocessor, "
            "Forge's --controlnet-preprocessor-models-dir), by preprocessor family", choices={
        "openpose": tuple(_pre("openpose", _ANNOTATORS + n, _LEGACY + "openpose/__init__.py")
                          for n in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
        "dw_openpose": tuple(_pre("openpose", u, _LEGACY + "openpose/__init__.py")
                             for u in ("https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx",
                                       "https://huggingface.co/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx")),
        "animal_openpose": tuple(_pre("openpose", u, _LEGACY + "openpose/__init__.py") for u in (
            "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx",
            _LLLITE + "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx")),
        "depth_midas": (_pre("midas", _CN_CKPTS + "dpt_hybrid-midas-501f0c75.pt", _LEGACY + "midas/api.py"),),
        "depth_zoe": (_pre("zoedepth", _ANNOTATORS + "ZoeD_M12_N.pt", _LEGACY + "zoe/__init__.py"),),
        "depth_leres": tuple(_pre("leres", _ANNOTATORS + n, _LEGACY + "leres/__init__.py")
                             for n in ("res101.pth", "latest_net_G.pth")),
        "depth_anything": (_pre("depth_anything", "https://huggingface.co/spaces/LiheYoung/Depth-Anything/resolve/main/"
                                "checkpoints/depth_anything_vitl14.pth", _LEGACY + "depth_anything.py"),),
        "depth_anything_v2": (_pre("depth_anything_v2", "https://huggingface.co/MackinationsAi/"
                                   "Depth-Anything-V2_Safetensors/resolve/main/depth_anything_v2_vitl.safetensors",
                                   _LEGACY + "depth_anything_v2.py"),),
        "normal_bae": (_pre("", _ANNOTATORS + "scannet.pt",
                            "extensions-builtin/forge_preprocessor_normalbae/scripts/preprocessor_normalbae.py"),),
        "hed": (_pre("hed", _ANNOTATORS + "ControlNetHED.pth", _LEGACY + "hed/__init__.py"),),
        "pidinet": (_pre("pidinet", _ANNOTATORS + "table5_pidinet.pth", _LEGACY + "pidinet/__init__.py"),),
        "teed": (_pre("TEED", _LLLITE + "7_model.pth", _LEGACY + "teed/__init__.py"),),
        "mlsd": (_pre("mlsd", _CN_CKPTS + "mlsd_large_512_fp32.pth", _LEGACY + "mlsd/__init__.py"),),
        "lineart": tuple(_pre("lineart", _ANNOTATORS + n, _LEGACY + "lineart/__init__.py")
                         for n in ("sk_model.pth", "sk_model2.pth")),
        "lineart_anime": (_pre("lineart_anime", _ANNOTATORS + "netG.pth", _LEGACY + "lineart_anime/__init__.py"),),
        "manga_line": (_pre("manga_line", _ANNOTATORS + "erika.pth", _LEGACY + "manga_line/__init__.py"),),
        "seg_ofcoco": (_pre("oneformer", _ANNOTATORS + "150_16_swin_l_oneformer_coco_100ep.pth",
                            _LEGACY + "oneformer/__init__.py"),),
        "seg_ofade20k": (_pre("oneformer", _ANNOTATORS + "250_16_swin_l_oneformer_ade20k_160k.pth",
                              _LEGACY + "oneformer/__init__.py"),),
        "seg_ufade20k": (_pre("uniformer", _CN_CKPTS + "upernet_global_small.pth", _LEGACY + "uniformer/__init__.py"),),
        "seg_anime_face": (_pre("anime_face_segment", _LLLITE + "UNet.pth",
                                _LEGACY + "anime_face_segment/__init__.py"),),
        "densepose": (_pre("densepose", "https://huggingface.co/LayerNorm/DensePose-TorchScript-with-hint-image/"
                           "resolve/main/densepose_r50_fpn_dl.torchscript", _LEGACY + "densepose/__init__.py"),),
        "inpaint_lama": (_pre("", _ANNOTATORS + "ControlNetLama.pth",
                              "extensions-builtin/forge_preprocessor_inpaint/scripts/preprocessor_inpaint.py"),),
    }),
    Feature("ip-adapter", "IP-Adapter and Revision image encoders (CLIP vision), for SD 1.5 and SDXL", choices={
        "sd15": (_pre("", _IPA + "models/image_encoder/model.safetensors", _SUPPORTED,
                      name="CLIP-ViT-H-14.safetensors"),),
        "sdxl": (_pre("", _IPA + "sdxl_models/image_encoder/model.safetensors", _SUPPORTED,
                      name="CLIP-ViT-bigG.safetensors"),),
    }, default_choices=("sd15", "sdxl")),
    Feature("instantid", "InstantID's face embedding (the 'InsightFace (InstantID)' preprocessor): insightface's "
            "antelopev2", tuple(
        _f(_ANTELOPE + n, "insightface/models/antelopev2",
           "extensions-builtin/forge_legacy_preprocessors/legacy_preprocessors/preprocessor.py")
        for n in ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"))),
)}

# Forge flags that point Forge at a folder on the volume where its default is elsewhere: CLIP's
# default is ~/.cache/clip (the container's disk, empty on every new worker).
FLAGS: dict[str, str] = {"--clip-models-path": "CLIP"}
# Forge reads the interrogator's categories from interrogate/ in its working folder (the checkout):
# install links it to models/interrogate, so they are the volume's files.
INTERROGATE_LINK = ("interrogate", "interrogate")  # (name in the checkout, folder under models/)

_SNAPSHOT = re.compile(rf"^models/{HF_HUB_FOLDER}/(models--[^/]+)/snapshots/([0-9a-f]{{40}})/[^/]+$")


def hf_cache_files(paths: Iterable[str]) -> dict[str, str]:
    """The small files install writes beside first-use files in the HF cache (volume-relative path -> text):
    each repository's ``refs/main`` naming its snapshot, and the libraries' cache markers. Empty when none
    of ``paths`` is in the cache."""
    out: dict[str, str] = {}
    for path in paths:
        m = _SNAPSHOT.match(path)
        if m:
            out[f"models/{HF_HUB_FOLDER}/{m.group(1)}/refs/main"] = m.group(2)
    if out:
        out.update({f"models/{HF_HUB_FOLDER}/{name}": text for name, text in HF_CACHE_MARKERS.items()})
    return out


def is_hf_cache_ref(path: str) -> bool:
    """A volume-relative path that is a repository's ref in the HF cache (install's, not a model)."""
    return re.match(rf"^models/{HF_HUB_FOLDER}/models--[^/]+/refs/[^/]+$", path) is not None


# Every file of Forge's tree (at FORGE_COMMIT, outside repositories/) where scan_forge_source finds a
# first-use download call: (number of calls, the feature that covers them, or why none needs to).
CALL_SITES: dict[str, tuple[int, str]] = {
    "modules/sd_vae_approx.py": (1, "previews"),
    "modules/sd_vae_taesd.py": (1, "previews, taesd-encode"),
    "modules/gfpgan_model.py": (2, "face-restore:gfpgan"),
    "modules/codeformer_model.py": (1, "face-restore:codeformer"),
    "modules/face_restoration_utils.py": (2, "face-restore (facexlib's detector and parser)"),
    "modules/esrgan_model.py": (1, "upscale:ESRGAN_4x"),
    "modules/realesrgan_model.py": (1, "upscale:R-ESRGAN ..."),
    "modules/dat_model.py": (2, "upscale:DAT x2/x3/x4"),
    "extensions-builtin/ScuNET/scripts/scunet_model.py": (1, "upscale:ScuNET GAN, ScuNET PSNR"),
    "extensions-builtin/SwinIR/scripts/swinir_model.py": (1, "upscale:SwinIR 4x"),
    "modules/upscaler.py": (1, "upscale (the upscalers' shared load_models)"),
    "modules/interrogate.py": (3, "interrogate"),
    "modules/deepbooru.py": (1, "deepbooru"),
    "modules/modelloader.py": (1, "the shared load_models: its callers are listed"),
    "modules/sd_models.py": (1, "none: lists checkpoints, model_url=None"),
    "modules_forge/supported_preprocessor.py": (1, "ip-adapter"),
    "extensions-builtin/sd_forge_ipadapter/lib_ipadapter/IPAdapterPlus.py": (1, "instantid (same files)"),
    "extensions-builtin/forge_legacy_preprocessors/legacy_preprocessors/preprocessor.py": (1, "instantid"),
    _LEGACY + "util.py": (1, _CNP + "depth_anything, depth_anything_v2, teed"),
    _LEGACY + "openpose/__init__.py": (5, _CNP + "openpose, dw_openpose, animal_openpose"),
    _LEGACY + "midas/api.py": (1, _CNP + "depth_midas"),
    _LEGACY + "zoe/__init__.py": (1, _CNP + "depth_zoe"),
    _LEGACY + "leres/__init__.py": (2, _CNP + "depth_leres"),
    _LEGACY + "hed/__init__.py": (1, _CNP + "hed"),
    _LEGACY + "pidinet/__init__.py": (1, _CNP + "pidinet"),
    _LEGACY + "mlsd/__init__.py": (1, _CNP + "mlsd"),
    _LEGACY + "lineart/__init__.py": (1, _CNP + "lineart"),
    _LEGACY + "lineart_anime/__init__.py": (1, _CNP + "lineart_anime"),
    _LEGACY + "manga_line/__init__.py": (1, _CNP + "manga_line"),
    _LEGACY + "oneformer/__init__.py": (1, _CNP + "seg_ofcoco, seg_ofade20k"),
    _LEGACY + "uniformer/__init__.py": (1, _CNP + "seg_ufade20k"),
    _LEGACY + "anime_face_segment/__init__.py": (1, _CNP + "seg_anime_face"),
    _LEGACY + "densepose/__init__.py": (1, _CNP + "densepose"),
    "extensions-builtin/forge_preprocessor_normalbae/scripts/preprocessor_normalbae.py": (1, _CNP + "normal_bae"),
    "extensions-builtin/forge_preprocessor_inpaint/scripts/preprocessor_inpaint.py": (1, _CNP + "inpaint_lama"),
    # Not covered: why each needs no feature (or cannot have one yet).
    _LEGACY + "keypose/__init__.py": (1, "none: no preprocessor of Forge's list uses keypose"),
    _LEGACY + "midas/midas/blocks.py": (
        2, "none: torch.hub.load only for the midas_v21 types, which depth_midas does not use"),
    _LEGACY + "zoe/zoedepth/models/base_models/midas.py": (
        1, "not covered: depth_zoe builds MiDaS through torch.hub.load from GitHub; it fails offline"),
    _LEGACY + "zoe/zoedepth/models/base_models/midas_repo/hubconf.py": (
        13, "none: torch.hub entry points of MiDaS, reached only through torch.hub.load"),
    _LEGACY + "zoe/zoedepth/models/base_models/midas_repo/midas/blocks.py": (2, "none: midas_v21 types only"),
    _LEGACY + "zoe/zoedepth/models/base_models/midas_repo/tf/make_onnx_model.py": (
        1, "none: a conversion script, not run by Forge"),
    _LEGACY + "zoe/zoedepth/models/model_io.py": (2, "none: loads from a url: or local: resource Forge never passes"),
    "extensions-builtin/forge_preprocessor_normalbae/annotator/normalbae/models/baseline.py": (
        1, "none: the baseline model, which normal_bae does not build"),
    "extensions-builtin/forge_preprocessor_normalbae/annotator/normalbae/models/submodules/efficientnet_repo/geffnet/"
    "helpers.py": (1, "none: pretrained=False in normal_bae's encoder"),
    "extensions-builtin/forge_preprocessor_normalbae/annotator/normalbae/models/submodules/encoder.py": (
        1, "none: torch.hub.load from the local repository (source='local')"),
    "extensions-builtin/forge_space_photo_maker_v2/forge_app.py": (1, "not covered: Forge spaces (the web UI only)"),
    "modules_forge/forge_space.py": (1, "not covered: Forge spaces (the web UI only)"),
    "spaces.py": (1, "not covered: Forge spaces (the web UI only)"),
    "modules/models/sd3/sd3_cond.py": (3, "none: A1111's SD3 code, which Forge's own loader replaces"),
    "download_supported_configs.py": (1, "none: a maintainer's script, not run by Forge"),
}

_CALL = re.compile(r"(load_file_from_url|load_models|hf_hub_download|snapshot_download|download_url_to_file"
                   r"|load_state_dict_from_url)\(|\btorch\.hub\.load\(|\bclip\.load\(")
_NOT_A_CALL = re.compile(r"^\s*(#|def |from |import )")


def scan_forge_source(root: Path) -> dict[str, int]:
    """Every Python file of Forge's tree at ``root`` (outside ``repositories/``) with first-use download
    calls, and how many: the calls ``CALL_SITES`` must account for."""
    found: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("repositories/", ".git/")):
            continue
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        count = sum(1 for line in lines if _CALL.search(line) and not _NOT_A_CALL.match(line))
        if count:
            found[rel] = count
    return found


def known_features() -> str:
    """Every feature as a spec names it, for error messages and docs."""
    out = []
    for f in FEATURES.values():
        out.append(f"{f.name}:{{{','.join(f.choices)}}}" if f.choices and f.default_choices is None
                   else f.name + (f"[:{','.join(f.choices)}]" if f.choices else ""))
    return "; ".join(out)


@dataclass(frozen=True)
class Chosen:
    """One entry of the spec's ``features``: a feature and its choices."""

    feature: Feature
    choices: tuple[str, ...]
    text: str  # as the spec wrote it

    @property
    def files(self) -> tuple[FirstUseFile, ...]:
        return self.feature.files_for(self.choices)


def parse_feature(text: str) -> Chosen:
    """``"previews"``, ``"face-restore:gfpgan"``, ``"upscale:R-ESRGAN 4x+,DAT x4"``; ValueError names the
    known features or choices."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    feature = FEATURES.get(name)
    if feature is None:
        raise ValueError(f"{text!r} is not a known feature; known: {', '.join(FEATURES)}")
    if not sep:
        if feature.choices and feature.default_choices is None:
            raise ValueError(f"{text!r} needs a choice ({name}:NAME[,NAME...]); choices: {', '.join(feature.choices)}")
        return Chosen(feature, feature.default_choices or (), text)
    if not feature.choices:
        raise ValueError(f"{text!r}: {name} takes no choices")
    chosen = tuple(dict.fromkeys(c.strip() for c in rest.split(",")))
    for choice in chosen:
        if choice not in feature.choices:
            raise ValueError(f"{text!r}: {choice!r} is not a choice of {name}; choices: {', '.join(feature.choices)}")
    return Chosen(feature, chosen, text)


def expand(features: tuple[str, ...]) -> list[tuple[FirstUseFile, str]]:
    """Each file the features fetch, once, with the spec's feature entry that brings it (the first)."""
    out: dict[str, tuple[FirstUseFile, str]] = {}
    for text in features:
        for file in parse_feature(text).files:
            out.setdefault(file.path, (file, text))
    return list(out.values())


def all_files() -> Iterator[tuple[FirstUseFile, str]]:
    """Every file of the table with the spec entry that adds it (``feature`` or ``feature:choice``)."""
    seen: set[str] = set()
    for f in FEATURES.values():
        entries = [(file, f.name) for file in f.files]
        entries += [(file, f"{f.name}:{choice}") for choice, files in f.choices.items() for file in files]
        for file, text in entries:
            if file.path not in seen:
                seen.add(file.path)
                yield file, text
