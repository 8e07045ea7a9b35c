#!/usr/bin/env python3
"""Write random-weight stand-ins for the files Forge fetches at first use, for the lab (no internet).

Each file has the architecture, state-dict key names and shapes, container format and file name of the
real one, built from the real module classes in the lab's venv (Forge's own modules, facexlib, spandrel,
BLIP's repository, openai-clip) with random initialisation. After writing, every file is loaded back by
the same function Forge's code path uses (spandrel's loader for GFPGAN and RealESRGAN, facexlib's
init_*_model, BLIP's blip_decoder with its missing-keys assertion, clip.load, the openpose annotators'
own classes, Forge's VAEApprox and TAESD decoder), so a file Forge would reject fails here first.

Written under --out, by the folder Forge looks in (relative to its models folder unless noted):

  VAE-approx/{model,vaeapprox-sdxl,vaeapprox-sd3}.pt        live previews, "Approx NN" (SD1.5, SDXL, SD3)
  VAE-taesd/{taesd,taesdxl,taesd3,taef1}_decoder.pth         live previews, "TAESD"
  GFPGAN/GFPGANv1.4.pth                                     face restore (GFPGAN)
  GFPGAN/detection_Resnet50_Final.pth, GFPGAN/parsing_parsenet.pth   facexlib's detector and parser
                                                            (Forge points facexlib's downloads at models/GFPGAN)
  Codeformer/codeformer-v0.1.0.pth                          face restore (CodeFormer)
  RealESRGAN/RealESRGAN_x4plus.pth                          upscaler "R-ESRGAN 4x+"
  BLIP/model_base_caption_capfilt_large.pth                 interrogate (BLIP caption)
  CLIP/ViT-L-14.pt                                          interrogate (clip.load, --clip-models-path)
  ControlNetPreprocessor/openpose/{body_pose_model,hand_pose_model,facenet}.pth   preprocessor "openpose*"
  forge/interrogate/{artists,flavors,mediums,movements}.txt  CLIP categories (Forge's cwd, not models/)
  hf/bert-base-uncased/{vocab.txt,tokenizer_config.json,config.json}   BLIP's tokenizer (Hugging Face cache)

and manifest.json: for each file its sha256, size and the upstream URL it stands in for. The CLIP
categories and BERT's vocabulary are data, not weights: they are synthetic word lists of the real
files' structure (BERT's special tokens at their ids, 30522 entries, so BLIP's two added tokens give
the 30524 rows of its embeddings).

Run it with the lab venv's python (Forge's imports need the venv):

  /work/lab/venv/bin/python scripts/make_first_use_standins.py --forge /work/lab/forge-src \
      --blip /work/lab/blip --out /work/labvol/standins

Deterministic for a given --seed; an existing file is kept unless --force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--forge", required=True, help="the stable-diffusion-webui-forge checkout (the lab's forge-src)")
ap.add_argument("--blip", required=True, help="BLIP's repository (the lab's blip)")
ap.add_argument("--out", required=True, help="output folder")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--only", default="", help="comma-separated names of stand-ins to write (default: all)")
ap.add_argument("--force", action="store_true", help="rewrite existing files")
opts = ap.parse_args()

FORGE = os.path.abspath(opts.forge)
BLIP = os.path.abspath(opts.blip)
OUT = Path(opts.out).resolve()
LEGACY = os.path.join(FORGE, "extensions-builtin", "forge_legacy_preprocessors")
sys.path[:0] = [FORGE, os.path.join(FORGE, "packages_3rdparty"), LEGACY, BLIP]
# Forge's modules parse sys.argv on import: give them only what they know.
sys.argv = [sys.argv[0], "--always-cpu", "--skip-torch-cuda-test"]
# A throwaway Hugging Face cache, named before anything imports huggingface_hub or transformers: both read
# HF_HOME once, at import, and the makers before BLIP's import them (Forge's modules do). BLIP's maker fills it.
HF_CACHE = Path(tempfile.mkdtemp(prefix="hf-standins-"))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(HF_CACHE))

import torch  # noqa: E402

GITHUB = "https://github.com"
HF = "https://huggingface.co"
# The upstream each stand-in replaces, as Forge's source at the lab's commit names it.
UPSTREAM = {
    "VAE-approx/model.pt": f"{GITHUB}/AUTOMATIC1111/stable-diffusion-webui/releases/download/v1.0.0-pre/model.pt",
    "VAE-approx/vaeapprox-sdxl.pt":
        f"{GITHUB}/AUTOMATIC1111/stable-diffusion-webui/releases/download/v1.0.0-pre/vaeapprox-sdxl.pt",
    "VAE-approx/vaeapprox-sd3.pt":
        f"{GITHUB}/AUTOMATIC1111/stable-diffusion-webui/releases/download/v1.0.0-pre/vaeapprox-sd3.pt",
    **{f"VAE-taesd/{n}": f"{GITHUB}/madebyollin/taesd/raw/main/{n}"
       for n in ("taesd_decoder.pth", "taesdxl_decoder.pth", "taesd3_decoder.pth", "taef1_decoder.pth")},
    "GFPGAN/GFPGANv1.4.pth": f"{GITHUB}/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
    "GFPGAN/detection_Resnet50_Final.pth":
        f"{GITHUB}/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
    "GFPGAN/parsing_parsenet.pth": f"{GITHUB}/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth",
    "Codeformer/codeformer-v0.1.0.pth": f"{GITHUB}/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
    "RealESRGAN/RealESRGAN_x4plus.pth": f"{GITHUB}/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
    "BLIP/model_base_caption_capfilt_large.pth":
        "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_caption_capfilt_large.pth",
    "CLIP/ViT-L-14.pt": "https://openaipublic.azureedge.net/clip/models/"
                        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    **{f"ControlNetPreprocessor/openpose/{n}": f"{HF}/lllyasviel/Annotators/resolve/main/{n}"
       for n in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")},
    **{f"forge/interrogate/{c}.txt": "https://raw.githubusercontent.com/pharmapsychotic/clip-interrogator/main/"
                                     f"clip_interrogator/data/{c}.txt"
       for c in ("artists", "flavors", "mediums", "movements")},
    **{f"hf/bert-base-uncased/{n}": f"{HF}/bert-base-uncased/resolve/main/{n}"
       for n in ("vocab.txt", "tokenizer_config.json", "config.json")},
}


def randomise(module: torch.nn.Module, gen: torch.Generator, std: float = 0.02) -> None:
    """Random normal weights (std 0.02), norm weights 1 and biases 0: the module's own init may be slow or absent."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def save(rel: str, obj: Any) -> Path:
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def write_text(rel: str, text: str) -> Path:
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- live previews -------------------------------------------------------------------------------------

def vae_approx(gen: torch.Generator) -> list[str]:
    from modules.sd_vae_approx import VAEApprox
    out = []
    for rel, channels in (("VAE-approx/model.pt", 4), ("VAE-approx/vaeapprox-sdxl.pt", 4),
                          ("VAE-approx/vaeapprox-sd3.pt", 16)):
        model = VAEApprox(latent_channels=channels)
        randomise(model, gen, 0.1)
        path = save(rel, model.state_dict())
        check = VAEApprox(latent_channels=channels)
        check.load_state_dict(torch.load(path, map_location="cpu"))  # as sd_vae_approx.model() does
        assert tuple(check(torch.zeros(1, channels, 8, 8)).shape) == (1, 3, 16, 16)
        out.append(rel)
    return out


def taesd(gen: torch.Generator) -> list[str]:
    from modules.sd_vae_taesd import TAESDDecoder, decoder
    out = []
    for rel, channels in (("VAE-taesd/taesd_decoder.pth", 4), ("VAE-taesd/taesdxl_decoder.pth", 4),
                          ("VAE-taesd/taesd3_decoder.pth", 16), ("VAE-taesd/taef1_decoder.pth", 16)):
        model = decoder(channels)
        randomise(model, gen, 0.05)
        path = save(rel, model.state_dict())
        check = TAESDDecoder(str(path))  # loads strictly; the latent channels follow the file name, as in Forge
        assert tuple(check.decoder(torch.zeros(1, channels, 8, 8)).shape) == (1, 3, 64, 64)
        out.append(rel)
    return out


# --- face restore --------------------------------------------------------------------------------------

def spandrel_check(path: Path, arch: str) -> Any:
    from modules.modelloader import load_spandrel_model
    # Forge's own loader: spandrel with its extra architectures, the architecture checked by name.
    descriptor = load_spandrel_model(path, device="cpu", expected_architecture=arch)
    assert descriptor.architecture.name == arch, (path, descriptor.architecture.name)
    return descriptor


def gfpgan(gen: torch.Generator) -> list[str]:
    from spandrel.architectures.GFPGAN import GFPGANArch
    from spandrel.architectures.GFPGAN.arch.gfpganv1_clean_arch import GFPGANv1Clean
    model = GFPGANv1Clean(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                          fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                          sft_half=True)
    randomise(model, gen)
    sd = model.state_dict()
    assert GFPGANArch().detect(sd)
    # The released file is basicsr's checkpoint: the EMA weights under params_ema.
    path = save("GFPGAN/GFPGANv1.4.pth", {"params_ema": sd})
    spandrel_check(path, "GFPGAN")
    return ["GFPGAN/GFPGANv1.4.pth"]


def facexlib_models(gen: torch.Generator) -> list[str]:
    from facexlib.detection import init_detection_model
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing import init_parsing_model
    from facexlib.parsing.parsenet import ParseNet
    det = RetinaFace(network_name="resnet50", half=False, device="cpu")
    randomise(det, gen)
    save("GFPGAN/detection_Resnet50_Final.pth", {k: v for k, v in det.state_dict().items()
                                                  if not k.endswith("num_batches_tracked")})
    parse = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    randomise(parse, gen)
    save("GFPGAN/parsing_parsenet.pth", parse.state_dict())
    # facexlib's own loaders, with the folder Forge gives them (a present file is never fetched).
    init_detection_model("retinaface_resnet50", half=False, device="cpu", model_rootpath=str(OUT / "GFPGAN"))
    init_parsing_model("parsenet", device="cpu", model_rootpath=str(OUT / "GFPGAN"))
    return ["GFPGAN/detection_Resnet50_Final.pth", "GFPGAN/parsing_parsenet.pth"]


def codeformer(gen: torch.Generator) -> list[str]:
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer
    model = CodeFormer(dim_embd=512, n_head=8, n_layers=9, codebook_size=1024, latent_size=256,
                       connect_list=["32", "64", "128", "256"], fix_modules=["quantize", "generator"])
    randomise(model, gen)
    path = save("Codeformer/codeformer-v0.1.0.pth", {"params_ema": model.state_dict()})
    spandrel_check(path, "CodeFormer")
    return ["Codeformer/codeformer-v0.1.0.pth"]


# --- upscaler ------------------------------------------------------------------------------------------

def realesrgan(gen: torch.Generator) -> list[str]:
    """basicsr's RRDBNet key names (the released file's), 64 features, 23 blocks, growth 32, scale 4."""
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int) -> None:
        sd[f"{name}.weight"] = torch.randn((cout, cin, 3, 3), generator=gen) * 0.02
        sd[f"{name}.bias"] = torch.zeros(cout)

    nf, gc = 64, 32
    conv("conv_first", 3, nf)
    for b in range(23):
        for r in (1, 2, 3):
            for c in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{c}", nf + (c - 1) * gc, gc if c < 5 else nf)
    conv("conv_body", nf, nf)
    conv("conv_up1", nf, nf)
    conv("conv_up2", nf, nf)
    conv("conv_hr", nf, nf)
    conv("conv_last", nf, 3)
    path = save("RealESRGAN/RealESRGAN_x4plus.pth", {"params_ema": sd})
    descriptor = spandrel_check(path, "ESRGAN")  # spandrel loads strictly into its RRDBNet
    assert descriptor.scale == 4, descriptor.scale
    return ["RealESRGAN/RealESRGAN_x4plus.pth"]


# --- interrogate ---------------------------------------------------------------------------------------

def bert_tokenizer() -> list[str]:
    """bert-base-uncased's layout: [PAD] 0, [unused0-98] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103."""
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 993)]
    vocab += [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "ve", "di", "pa", "qu", "zo", "be", "fi", "gu", "ho"]
    words = (a + b + c + d for a in syllables for b in syllables for c in syllables for d in syllables)
    while len(vocab) < 30522:
        word = next(words)
        vocab.append(word)
        if len(vocab) < 30522:
            vocab.append("##" + word)
    assert len(vocab) == 30522 and len(set(vocab)) == 30522
    base = "hf/bert-base-uncased"
    write_text(f"{base}/vocab.txt", "\n".join(vocab) + "\n")
    write_text(f"{base}/tokenizer_config.json", json.dumps({"do_lower_case": True, "model_max_length": 512}) + "\n")
    write_text(f"{base}/config.json", json.dumps({
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30522}, indent=2) + "\n")
    return [f"{base}/{n}" for n in ("vocab.txt", "tokenizer_config.json", "config.json")]


def hf_cache_with_bert() -> None:
    """The BERT stand-in in the throwaway Hugging Face cache (HF_HOME), for building and checking BLIP here."""
    revision = "0" * 40
    snap = HF_CACHE / "hub" / "models--bert-base-uncased" / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        (snap / name).write_bytes((OUT / "hf/bert-base-uncased" / name).read_bytes())
    (HF_CACHE / "hub" / "models--bert-base-uncased" / "refs").mkdir(exist_ok=True)
    (HF_CACHE / "hub" / "models--bert-base-uncased" / "refs" / "main").write_text(revision)


def blip(gen: torch.Generator) -> list[str]:
    if not (OUT / "hf/bert-base-uncased/vocab.txt").is_file():
        bert_tokenizer()
    hf_cache_with_bert()

    class FakeFairscale:  # as Forge's interrogate.create_fake_fairscale: BLIP imports it, never uses it
        def checkpoint_wrapper(self) -> None:
            pass

    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"] = FakeFairscale  # type: ignore[assignment]
    from models.blip import blip_decoder
    med = os.path.join(BLIP, "configs", "med_config.json")
    model = blip_decoder(pretrained="", image_size=384, vit="base", med_config=med)
    randomise(model, gen)
    path = save("BLIP/model_base_caption_capfilt_large.pth", {"model": model.state_dict()})
    del model
    # BLIP's own loader asserts that no key is missing; Forge calls it exactly so.
    check = blip_decoder(pretrained=str(path), image_size=384, vit="base", med_config=med)
    check.eval()
    with torch.no_grad():
        caption = check.generate(torch.zeros(1, 3, 384, 384), sample=False, num_beams=1, min_length=2, max_length=6)
    assert isinstance(caption[0], str)
    return ["BLIP/model_base_caption_capfilt_large.pth"]


def clip_vit_l14(gen: torch.Generator) -> list[str]:
    import clip
    from clip.model import CLIP
    model = CLIP(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                 context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                 transformer_layers=12)
    with torch.no_grad():
        for p in model.parameters():  # CLIP's own init (initialize_parameters) ran; make it the seed's
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    # OpenAI's file is a TorchScript archive (clip.load tries torch.jit.load first; a plain torch.save file
    # fails there, and its fallback then reads from the wrong offset), traced, with fp16 weights.
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
    traced = traced.half()
    path = OUT / "CLIP/ViT-L-14.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(traced, str(tmp))
    os.replace(tmp, path)
    del model, traced
    # clip.load as Forge calls it (jit=False: the archive's state dict rebuilt by clip's build_model).
    loaded, _ = clip.load(str(path), device="cpu", jit=False)
    assert loaded.visual.input_resolution == 224 and loaded.context_length == 77
    return ["CLIP/ViT-L-14.pt"]


def clip_categories() -> list[str]:
    """Synthetic phrase lists named as clip-interrogator's (Forge reads every *.txt in the folder)."""
    out = []
    for i, cat in enumerate(("artists", "flavors", "mediums", "movements")):
        lines = [f"{cat[:-1]} {chr(97 + (j % 26))}{j}" for j in range(20 + 5 * i)]
        rel = f"forge/interrogate/{cat}.txt"
        write_text(rel, "\n".join(lines) + "\n")
        out.append(rel)
    return out


# --- ControlNet preprocessor ---------------------------------------------------------------------------

def openpose(gen: torch.Generator) -> list[str]:
    from annotator.openpose.body import Body
    from annotator.openpose.face import Face, FaceNet
    from annotator.openpose.hand import Hand
    from annotator.openpose.model import bodypose_model, handpose_model
    out = []
    for rel, model, cls, strip in (("body_pose_model.pth", bodypose_model(), Body, True),
                                   ("hand_pose_model.pth", handpose_model(), Hand, True),
                                   ("facenet.pth", FaceNet(), Face, False)):
        randomise(model, gen, 0.01)
        sd = model.state_dict()
        if strip:  # the released body/hand files lack the first name part (util.transfer adds it back)
            sd = {k.split(".", 1)[1]: v for k, v in sd.items()}
        rel = f"ControlNetPreprocessor/openpose/{rel}"
        path = save(rel, sd)
        cls(str(path))  # the annotator's own loader (strict load_state_dict)
        out.append(rel)
    return out


MAKERS: dict[str, Callable[[torch.Generator], list[str]]] = {
    "vae-approx": vae_approx, "taesd": taesd, "gfpgan": gfpgan, "facexlib": facexlib_models,
    "codeformer": codeformer, "realesrgan": realesrgan, "bert": lambda gen: bert_tokenizer(), "blip": blip,
    "clip": clip_vit_l14, "clip-categories": lambda gen: clip_categories(), "openpose": openpose,
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    manifest_path = OUT / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    wanted = [n for n in opts.only.split(",") if n] or list(MAKERS)
    unknown = sorted(set(wanted) - set(MAKERS))
    if unknown:
        sys.exit(f"unknown stand-in(s) {', '.join(unknown)}; known: {', '.join(MAKERS)}")
    for i, name in enumerate(wanted):
        done = manifest.get("makers", {}).get(name)
        if done and not opts.force and all((OUT / rel).is_file() for rel in done):
            print(f"{name}: kept ({len(done)} files)")
            continue
        t0 = time.monotonic()
        gen = torch.Generator().manual_seed(opts.seed * 1000 + i)
        files = MAKERS[name](gen)
        manifest.setdefault("makers", {})[name] = files
        for rel in files:
            path = OUT / rel
            manifest.setdefault("files", {})[rel] = {"sha256": sha256(path), "size": path.stat().st_size,
                                                     "upstream": UPSTREAM[rel]}
        print(f"{name}: {len(files)} files, {sum((OUT / r).stat().st_size for r in files) / 2**20:.1f} MiB, "
              f"{time.monotonic() - t0:.1f} s")
        tmp = manifest_path.with_name("manifest.json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, manifest_path)


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(HF_CACHE, ignore_errors=True)
