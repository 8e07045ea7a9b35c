#!/usr/bin/env python3
"""Write a random-weight SDXL (base 1.0 architecture) checkpoint for the Forge lab.

The SDXL counterpart of the lab's ``make_random_sd15.py`` (``/work/shared/forge-lab/``): the file has
the key names and shapes of ``sd_xl_base_1.0.safetensors`` (SGM / LDM layout), about 6.9 GB in fp16:

  model.diffusion_model.*                      UNet (~2.57B params)
  first_stage_model.*                          VAE (~84M params)
  conditioner.embedders.0.transformer.text_model.*   CLIP ViT-L/14 text encoder (~123M params)
  conditioner.embedders.1.model.*              OpenCLIP ViT-bigG/14 text tower in open_clip's names
                                               (transformer.resblocks.N.attn.in_proj_weight, ln_final,
                                               text_projection, positional_embedding, logit_scale, ...)

Weights are random normal (std 0.02), norm weights 1, biases 0, fp16; deterministic for a --seed.
Names and shapes come from Forge's own modules built on the meta device (nothing big allocated) and
its shipped SDXL configs; the OpenCLIP names are the inverse of Forge's (huggingface_guess's)
conversion, which the check below runs forward. The file is written tensor by tensor (peak memory is
one tensor, not the checkpoint), to OUT.tmp, checked, then renamed to OUT.

The check, on the written file: safetensors opens it and a few values are what they should be;
huggingface_guess detects it as SDXL (stabilityai/stable-diffusion-xl-base-1.0); Forge's own
``backend.loader.split_state_dict`` splits it, and every component's keys and shapes equal those of
the module Forge's loader builds for it (UNet from the detected config, VAE, both text encoders),
with only the keys the loader itself ignores missing, and nothing left over.

Run it with the lab venv's python (needs Forge's requirements: torch, diffusers, transformers,
safetensors):

  /work/lab/venv/bin/python scripts/make_random_sdxl.py --forge /work/lab/forge-src \\
      --out /work/labvol/sdxl/random-sdxl.safetensors
"""

import argparse
import json
import os
import re
import struct
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--forge", required=True, help="the stable-diffusion-webui-forge checkout")
ap.add_argument("--out", required=True, help="output .safetensors path")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--std", type=float, default=0.02)
ap.add_argument("--force", action="store_true", help="overwrite an existing file")
opts = ap.parse_args()

if os.path.exists(opts.out) and not opts.force:
    print(f"exists, not rewriting (use --force): {opts.out}")
    sys.exit(0)

forge = os.path.abspath(opts.forge)
sys.path.insert(0, forge)
sys.path.insert(0, os.path.join(forge, "repositories", "huggingface_guess"))
sys.path.insert(0, os.path.join(forge, "packages_3rdparty"))  # gguf, as modules/paths.py adds it
# backend.args parses sys.argv on import: give it only what it knows.
sys.argv = [sys.argv[0], "--always-cpu"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import backend.loader  # noqa: E402
import huggingface_guess  # noqa: E402
import torch  # noqa: E402
from backend.nn.clip import IntegratedCLIP  # noqa: E402
from backend.nn.unet import IntegratedUNet2DConditionModel  # noqa: E402
from backend.nn.vae import IntegratedAutoencoderKL  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

REPO = "stabilityai/stable-diffusion-xl-base-1.0"
CFG = os.path.join(forge, "backend", "huggingface", *REPO.split("/"))

# The SDXL base UNet in Forge's (LDM) form: huggingface_guess.detection's SDXL entry (without dtype).
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# What backend/loader.py ignores when it loads a text encoder (load_huggingface_component).
CLIP_IGNORED = {"transformer.text_projection.weight", "transformer.text_model.embeddings.position_ids", "logit_scale"}
LOGIT_SCALE = 4.6052  # ln(100), as in the real file

# Transformers' CLIP names -> open_clip's, per layer: the inverse of huggingface_guess.utils.transformers_convert.
_LAYER = re.compile(r"transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                "self_attn.out_proj": "attn.out_proj"}
_TOP = {
    "transformer.text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "transformer.text_model.embeddings.position_embedding.weight": "positional_embedding",
    "transformer.text_model.final_layer_norm.weight": "ln_final.weight",
    "transformer.text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}


def build_unet(cfg):
    # As backend/loader.py does; from_config drops the keys __init__ does not take.
    return IntegratedUNet2DConditionModel.from_config(dict(cfg))


def build_vae():
    return IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(CFG, "vae")))


def build_clip(component):
    # As backend/loader.py does for both text encoders (CLIPTextModel even for CLIPTextModelWithProjection).
    return IntegratedCLIP(CLIPTextModel, CLIPTextConfig.from_pretrained(os.path.join(CFG, component)),
                          add_text_projection=True)


def kinds(module, prefix=""):
    """{prefix + name: (shape, kind)}, kind "one" (norm weight), "zero" (bias), "randn" (the rest)."""
    norms = set()
    for mname, m in module.named_modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            norms |= {f"{mname}.{p}" for p in ("weight", "bias") if getattr(m, p, None) is not None}
    out = {}
    for name, t in module.state_dict().items():
        if name in norms and name.endswith(".weight"):
            kind = "one"
        elif name.endswith(".bias"):
            kind = "zero"
        else:
            kind = "randn"
        out[prefix + name] = (tuple(t.shape), kind)
    return out


def open_clip_specs(module, prefix):
    """The OpenCLIP text tower's specs in open_clip's names, from Forge's CLIP-G module."""
    out = {}
    qkv = {}
    for name, (shape, kind) in kinds(module).items():
        if name in _TOP:
            out[prefix + _TOP[name]] = (shape, "logit_scale" if name == "logit_scale" else kind)
        elif name == "transformer.text_projection.weight":
            # open_clip keeps x @ text_projection: the Linear weight transposed (the convert transposes back).
            out[prefix + "text_projection"] = (shape[::-1], kind)
        elif (m := _LAYER.match(name)) is None:
            raise SystemExit(f"no open_clip name for CLIP-G key {name!r}: transformers changed? update the map")
        elif m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault(f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", []).append((shape, kind))
        elif m[2] in _LAYER_PARTS:
            out[f"{prefix}transformer.resblocks.{m[1]}.{_LAYER_PARTS[m[2]]}.{m[3]}"] = (shape, kind)
        else:
            raise SystemExit(f"no open_clip name for CLIP-G key {name!r}: transformers changed? update the map")
    for key, parts in qkv.items():
        assert len(parts) == 3 and len({(s[1:], k) for s, k in parts}) == 1, (key, parts)
        out[key] = ((sum(s[0] for s, _ in parts), *parts[0][0][1:]), parts[0][1])
    return out


def specs():
    with torch.device("meta"):
        out = kinds(build_unet(SDXL_UNET), "model.diffusion_model.")
        out |= kinds(build_vae(), "first_stage_model.")
        # IntegratedCLIP adds transformer.text_projection and logit_scale; the real file has neither for CLIP-L.
        clip_l = kinds(build_clip("text_encoder"), "conditioner.embedders.0.")
        out |= {k: v for k, v in clip_l.items() if k.startswith("conditioner.embedders.0.transformer.text_model.")}
        out |= open_clip_specs(build_clip("text_encoder_2"), "conditioner.embedders.1.model.")
    # Real SDXL files carry CLIP-L's position ids too (Forge ignores them).
    out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = ((1, 77), "position_ids")
    return out


DTYPES = {"position_ids": (torch.int64, "I64")}


def make(shape, kind, gen):
    if kind == "position_ids":
        return torch.arange(shape[1], dtype=torch.int64)[None]
    if kind == "one":
        return torch.ones(shape, dtype=torch.float16)
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.float16)
    if kind == "logit_scale":
        return torch.tensor(LOGIT_SCALE, dtype=torch.float16)
    return (torch.randn(shape, generator=gen) * opts.std).half()


def write(path, spec, metadata):
    """Stream a safetensors file: the header first (offsets from the shapes), then each tensor as made."""
    header = {"__metadata__": metadata}
    offset = 0
    for key in sorted(spec):
        shape, kind = spec[key]
        dtype, code = DTYPES.get(kind, (torch.float16, "F16"))
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(opts.seed)
    done, step, t0 = 0, 1 << 30, time.time()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in sorted(spec):
            shape, kind = spec[key]
            t = make(shape, kind, gen)
            assert tuple(t.shape) == shape, (key, t.shape, shape)
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            done += header[key]["data_offsets"][1] - header[key]["data_offsets"][0]
            if done // step != (done - t.nbytes) // step:
                print(f"  {done / 2**30:.1f} / {offset / 2**30:.1f} GiB, {time.time() - t0:.0f}s", flush=True)
        f.flush()
        os.fsync(f.fileno())
    assert os.path.getsize(path) == 8 + len(raw) + offset


def compare(what, want, got, ignored=(), ignore_start=None):
    """Forge's load_state_dict(strict=False) plus its ignore lists, and shapes: all must be clean."""
    def skip(k):
        return k in ignored or (ignore_start is not None and k.startswith(ignore_start))
    missing = sorted(k for k in set(want) - set(got) if not skip(k))
    unexpected = sorted(k for k in set(got) - set(want) if not skip(k))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    assert not (missing or unexpected or shapes), (
        f"{what}: missing {missing[:5]} unexpected {unexpected[:5]} shape {[(k, want[k], got[k]) for k in shapes[:5]]}"
        f" ({len(missing)}, {len(unexpected)}, {len(shapes)})")


def verify(path):
    # The real safetensors library reads the streamed file; a few values are what make() wrote.
    sd = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            sl = f.get_slice(k)
            dtype = {"F16": torch.float16, "I64": torch.int64}[sl.get_dtype()]
            sd[k] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        def random(t):
            return abs(float(t.float().std()) - opts.std) < opts.std / 10

        probe = {
            "model.diffusion_model.out.0.weight": lambda t: bool((t == 1).all()),
            "model.diffusion_model.out.0.bias": lambda t: bool((t == 0).all()),
            "conditioner.embedders.1.model.logit_scale": lambda t: abs(float(t) - LOGIT_SCALE) < 1e-2,
            "model.diffusion_model.input_blocks.0.0.weight": random,
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": random,
        }
        for k, ok in probe.items():
            assert ok(f.get_tensor(k)), f"unexpected values in {k}"

    guess = huggingface_guess.guess(sd)
    assert guess is not None, "huggingface_guess does not recognise the UNet"
    name = type(guess).__name__
    assert name == "SDXL" and guess.huggingface_repo == REPO, (name, guess.huggingface_repo)

    # Forge's own split (backend/loader.py: detection, then the VAE/CLIP prefix handling and the
    # OpenCLIP -> transformers conversion), fed our meta state dict instead of reading the file again.
    # It takes the keys it uses out of the dict it loaded: whatever stays there, no component got
    # (and whatever the CLIP stage left, it prints as 'ignore'; its conversion's misses would be
    # unexpected keys of a text encoder below).
    fed = dict(sd)
    real_load = backend.loader.load_torch_file
    backend.loader.load_torch_file = lambda _path: fed
    try:
        parts, guess2 = backend.loader.split_state_dict(path)
    finally:
        backend.loader.load_torch_file = real_load
    assert type(guess2).__name__ == "SDXL", type(guess2).__name__
    assert set(parts) == {"unet", "vae", "text_encoder", "text_encoder_2"}, sorted(parts)
    assert not fed, f"{len(fed)} keys taken by no component, e.g. {sorted(fed)[:5]}"

    def shapes(d):
        return {k: tuple(v.shape) for k, v in d.items()}

    with torch.device("meta"):
        compare("unet", shapes(build_unet(guess2.unet_config).state_dict()), shapes(parts["unet"]))
        compare("vae", shapes(build_vae().state_dict()), shapes(parts["vae"]), ignore_start="loss.")
        for c in ("text_encoder", "text_encoder_2"):
            compare(c, shapes(build_clip(c).state_dict()), shapes(parts[c]), ignored=CLIP_IGNORED)
    # text_encoder_2 must be complete, projection and logit scale included (they are only ignorable for CLIP-L).
    lacks = {"transformer.text_projection.weight", "logit_scale"} - set(parts["text_encoder_2"])
    assert not lacks, f"text_encoder_2 lacks {sorted(lacks)}"
    counts = {k: len(v) for k, v in parts.items()}
    print(f"huggingface_guess: {name} ({guess.huggingface_repo}), model type {guess2.model_type}; "
          f"Forge's split {counts}: keys and shapes match Forge's modules")


def main():
    t0 = time.time()
    spec = specs()
    n = sum(torch.Size(s).numel() for s, _ in spec.values())
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    tmp = opts.out + ".tmp"
    print(f"writing {len(spec)} tensors, {n / 1e6:.1f}M params to {tmp}", flush=True)
    try:
        write(tmp, spec, {"format": "pt", "lab": f"random SDXL weights, seed={opts.seed}, std={opts.std}"})
        verify(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, opts.out)
    print(f"wrote {opts.out}: {len(spec)} tensors, {n / 1e6:.1f}M params, "
          f"{os.path.getsize(opts.out) / 2**30:.2f} GiB ({os.path.getsize(opts.out)} bytes), {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
