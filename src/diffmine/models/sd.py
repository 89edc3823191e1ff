"""Stable Diffusion (1.x / 2.x-base and finetunes of them) through diffusers: ``--model sd:PATH_OR_ID``.

The model is read from a folder laid out like a hub Stable Diffusion repository, or from a hub id
(``stable-diffusion-v1-5/stable-diffusion-v1-5``, the authors' ``diff-mining/cardb`` ...)::

    MODEL/unet/           UNet2DConditionModel   (trained: fully, or LoRA adapters only)
    MODEL/vae/            AutoencoderKL          (frozen; posterior MEAN, so encoding is deterministic)
    MODEL/text_encoder/   CLIPTextModel          (frozen; replaceable with ``text_encoder=...``)
    MODEL/tokenizer/      CLIPTokenizer
    MODEL/scheduler/      any DDPM-family scheduler config, read as a DDPMScheduler

Prompts are few (one per label and the null prompt) and the text encoder is frozen, so each
prompt's CLIP states are computed once per device and cached.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..lineage import digest, file_digest
from . import ModelError
from .base import Backend, Denoiser

SUBFOLDERS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,  # tokenizer.json, or vocab.json + merges.txt
    "scheduler": "scheduler_config.json",
}
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# the weights file the loaders read, first found wins (each may be sharded: NAME.index.json + shards),
# by subfolder: diffusers models (unet/, vae/) and transformers models (text_encoder/, a CLIP folder's root)
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _locate(path_or_id: str) -> tuple[str, bool]:
    """(where to load from, is a local folder): local folders become absolute paths."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: not a folder (a Stable Diffusion model is a folder with unet/, vae/, "
                             "text_encoder/, tokenizer/ and scheduler/)")
        return str(path.resolve()), True
    looks_like_path = path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1
    if looks_like_path or not _HUB_ID.match(path_or_id):
        raise ModelError(f"{path_or_id}: no such model folder")
    return path_or_id, False


def _check_folder(root: Path, subfolders: list[str]) -> None:
    """A clear message for a folder that is not a hub-style SD repository."""
    for sub in subfolders:
        folder = root / sub
        if not folder.is_dir():
            raise ModelError(f"{root}: not a Stable Diffusion model folder: no {sub}/ subfolder "
                             f"(expected {', '.join(s + '/' for s in SUBFOLDERS)} as in a hub SD repository)")
        config = SUBFOLDERS[sub]
        if config is not None and not (folder / config).is_file():
            raise ModelError(f"{folder}: no {config} in it")
        if sub == "tokenizer" and not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
            raise ModelError(f"{folder}: no tokenizer files in it (tokenizer.json, or vocab.json + merges.txt)")


def base_subfolders(separate_text_encoder: bool) -> list[str]:
    """The subfolders of a base model that are loaded: all five, less text_encoder/ and tokenizer/
    when another text encoder replaces them."""
    return [s for s in SUBFOLDERS if not (separate_text_encoder and s in ("text_encoder", "tokenizer"))]


def encoder_subfolders(root: Path) -> list[str]:
    """The parts of a ``--text-encoder`` folder that are loaded: an SD-style folder's text_encoder/
    and tokenizer/, else the folder itself ("", a CLIP repository); as :func:`_load_text_encoder` reads it."""
    return ["text_encoder", "tokenizer"] if (root / "text_encoder").is_dir() else [""]


def checked_subfolders(key: str, folder: Path, separate_text_encoder: bool) -> list[str]:
    """The subfolders loaded from a local ``base`` or ``text_encoder`` folder (what :func:`fingerprint`
    covers), once checked to be there: one line naming what is missing, as loading would say."""
    if key == "base":
        subfolders = base_subfolders(separate_text_encoder)
    else:
        subfolders = encoder_subfolders(folder)
        if subfolders == [""] and not (folder / "config.json").is_file():
            raise ModelError(f"{folder}: not a text encoder folder: no config.json (nor a text_encoder/ subfolder)")
    _check_folder(folder, [s for s in subfolders if s])
    return subfolders


def loaded_files(root: Path, subfolders: list[str]) -> list[Path]:
    """The files the loaders read from ``root``'s ``subfolders`` ("" = the root itself), sorted.

    In each: its JSON and text files (configs, tokenizer files) and the one weights file (or the
    shards of the one index) the loader picks, safetensors before .bin. Nothing else: an fp16 or
    non-EMA variant, a .ckpt beside it, a README or an unused subfolder (safety_checker/) is not
    read, so it neither costs time nor makes two copies of the same model differ.
    """
    files = []
    for sub in subfolders:
        folder = root / sub
        names = DIFFUSERS_WEIGHTS if sub in ("unet", "vae") else TRANSFORMERS_WEIGHTS
        for name in names:
            index = folder / f"{name}.index.json"
            if (folder / name).is_file():
                files.append(folder / name)
                break
            if index.is_file():  # sharded: the index and the shards it names
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise ModelError(f"{index}: not a weights index ({_short(exc)})") from None
                # a shard is a file beside its index (as diffusers and transformers load them): a name
                # like "../x" or "/dev/zero" would have the fingerprint read another file, or never end
                outside = [shard for shard in shards if not isinstance(shard, str) or Path(shard).name != shard
                           or shard in ("", ".", "..")]
                if outside:
                    raise ModelError(f"{index}: names {outside[0]!r}, not a file beside it")
                files += [index] + [folder / str(shard) for shard in shards]
                break
        files += [f for f in folder.iterdir() if f.is_file() and f.suffix in (".json", ".txt")
                  and not f.name.endswith(".index.json")] if folder.is_dir() else []
    return sorted(set(files))


def fingerprint(root: str | Path, subfolders: list[str]) -> str:
    """A content fingerprint of what is loaded from a local model folder: a hash (SHA-256, as every
    identity of a run) over the sorted relative paths, sizes and SHA-256 of the :func:`loaded_files`.

    Recorded in ``backend.json`` when a model is trained, it lets ``diffmine relocate`` check that
    a folder elsewhere (a copied run on another machine) holds the same base model, whatever its
    path; only the files the loaders read count, so an unused 1 GB safety_checker/ costs nothing.
    Reading the files is the cost: SHA-256 hashed 1.4 GB/s on one core from the page cache (the
    2-core test machine), so about 3 s for SD 1.5's 4.3 GB (fp32 UNet, VAE, text encoder), more from a cold disk.
    """
    root = Path(root)
    return digest([[path.relative_to(root).as_posix(), path.stat().st_size, file_digest(path)]
                   for path in loaded_files(root, subfolders)])


def _load(what: str, where: str, loader, **kwargs):
    try:
        return loader(where, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear message
        sub = kwargs.get("subfolder")
        place = f"{where}/{sub}" if sub else where
        offline = " (offline: HF_HUB_OFFLINE=1; download the model once and give its folder)" \
            if not Path(where).exists() and os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ModelError(f"{place}: cannot load the {what}{offline}: {_short(exc)}") from None


class CLIPPromptEncoder(torch.nn.Module):
    """Prompt strings -> CLIP ``last_hidden_state`` (B, L, D), padded to the maximum length.

    The text encoder is frozen; the states of each prompt are computed once per device (in
    float32, outside autocast and outside inference mode, so cached tensors serve training too).
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_encoder.requires_grad_(False)
        self.text_encoder.eval()
        limit = getattr(tokenizer, "model_max_length", None) or 77
        self.max_length = int(min(limit, text_encoder.config.max_position_embeddings))
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def train(self, mode: bool = True) -> "CLIPPromptEncoder":
        super().train(mode)
        self.text_encoder.eval()  # frozen: never dropout
        return self

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # moved or cast: recompute on the new device
        return super()._apply(fn, *args, **kwargs)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        missing = [p for p in dict.fromkeys(prompts) if (p, str(device)) not in self._cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids.to(device)
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
                states = self.text_encoder(ids).last_hidden_state.float()
            for p, s in zip(missing, states):
                self._cache[(p, str(device))] = s
        return torch.stack([self._cache[(p, str(device))] for p in prompts])


class StableDiffusionBackend(Backend):
    default_feature_block = 1

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, spec: dict, lora_rank: int = 0):
        cross = unet.config.cross_attention_dim
        hidden = text_encoder.config.hidden_size
        if cross != hidden:
            raise ModelError(f"the text encoder ({spec.get('text_encoder') or spec['base']}) gives {hidden}-d states "
                             f"but the UNet of {spec['base']} expects cross_attention_dim {cross}")
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ModelError(f"{spec['base']}: the scheduler predicts {prediction!r}; diffmine needs an "
                             "epsilon-prediction model (SD 1.x, SD 2.x-base)")
        self.vae = vae.eval()
        self.vae.requires_grad_(False)
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.lora_rank = int(lora_rank)
        if self.lora_rank > 0:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS))
            self.default_learning_rate = 1e-4
        else:
            unet.requires_grad_(True)
            self.default_learning_rate = 1e-5
        self.denoiser = Denoiser(unet, CLIPPromptEncoder(tokenizer, text_encoder))
        self.scheduler = scheduler
        self.spec = spec
        # spec keys still to compute at the first save: {key: (local folder, its loaded subfolders)}
        self.unfingerprinted: dict[str, tuple[Path, list[str]]] = {}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str, lora_rank: int = 0, text_encoder: str | None = None,
                        **unknown) -> "StableDiffusionBackend":
        """Load the parts of a hub-style SD repository (folder or hub id).

        Args:
            lora_rank: 0 trains the full UNet; r > 0 adds LoRA adapters of rank r to the UNet's
                attention projections (to_q, to_k, to_v, to_out.0) and trains only those
            text_encoder: another CLIP text encoder (folder or hub id), its tokenizer from the
                same place: a CLIP repository (config at its root) or an SD-style one
                (text_encoder/ and tokenizer/)
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if unknown:
            raise ModelError(f"unknown option(s) for an sd: model: {', '.join(sorted(unknown))} "
                             "(known: lora_rank, text_encoder)")
        if not path_or_id:
            raise ModelError("sd: needs a model folder or hub id, e.g. sd:stable-diffusion-v1-5/stable-diffusion-v1-5")
        try:
            lora_rank = int(lora_rank or 0)
        except (TypeError, ValueError):
            raise ModelError(f"lora_rank must be an integer, got {lora_rank!r}") from None
        if lora_rank < 0:
            raise ModelError(f"lora_rank must be >= 0, got {lora_rank}")
        base, local = _locate(str(path_or_id))
        if local:
            checked_subfolders("base", Path(base), bool(text_encoder))
        unet = _load("UNet", base, UNet2DConditionModel.from_pretrained, subfolder="unet")
        vae = _load("VAE", base, AutoencoderKL.from_pretrained, subfolder="vae")
        scheduler = _load("noise schedule", base, DDPMScheduler.from_pretrained, subfolder="scheduler")
        encoder_source, encoder_local = None, False
        if text_encoder:
            encoder_source, encoder_local = _locate(str(text_encoder))
            clip, tokenizer = _load_text_encoder(encoder_source, encoder_local, CLIPTextModel, CLIPTokenizer)
        else:
            clip = _load("text encoder", base, CLIPTextModel.from_pretrained, subfolder="text_encoder")
            tokenizer = _load("tokenizer", base, CLIPTokenizer.from_pretrained, subfolder="tokenizer")
        spec = {"kind": "sd", "base": base, "lora_rank": lora_rank, "text_encoder": encoder_source}
        backend = cls(unet, vae, clip, tokenizer, scheduler, spec, lora_rank)
        # fingerprinted when first saved (a trained model), not here: a model only scored with is never saved
        if local:
            backend.unfingerprinted["base_fingerprint"] = (Path(base), base_subfolders(bool(text_encoder)))
        if encoder_local:
            backend.unfingerprinted["text_encoder_fingerprint"] = (Path(encoder_source),
                                                                   encoder_subfolders(Path(encoder_source)))
        return backend

    @classmethod
    def from_spec(cls, spec: dict, sources: dict | None = None) -> "StableDiffusionBackend":
        """Rebuild the architecture recorded in ``backend.json`` (LoRA adapters included) with the
        base weights; the trained weights are loaded on top by :func:`load_backend`. ``sources``:
        where the base and text encoder are read from when not at their recorded paths (a relocated
        run); the spec stays the recorded one, so saving the model again writes the same bytes."""
        sources = sources or {}
        backend = cls.from_pretrained(sources.get("base", spec["base"]), lora_rank=spec.get("lora_rank", 0),
                                      text_encoder=sources.get("text_encoder", spec.get("text_encoder")))
        backend.spec, backend.unfingerprinted = dict(spec), {}
        return backend

    def local_sources(self) -> dict[str, tuple[str, str]]:
        return {key.removesuffix("_fingerprint"): (str(folder), fingerprint(folder, subfolders))
                for key, (folder, subfolders) in self.unfingerprinted.items()}

    def save(self, directory: str | Path) -> None:
        """Also record, the first time, a fingerprint of each local folder the model was built from
        (``base_fingerprint``, ``text_encoder_fingerprint``): ``diffmine relocate`` checks a moved
        base against it. Hub ids get none; a loaded model keeps the spec it was saved with."""
        for key, (folder, subfolders) in self.unfingerprinted.items():
            self.spec[key] = fingerprint(folder, subfolders)
        self.unfingerprinted = {}
        super().save(directory)

    # -- device ---------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "StableDiffusionBackend":
        self.denoiser.to(device)  # UNet and text encoder
        self.vae.to(device)
        return self

    # -- encoders -------------------------------------------------------------------------
    def _scale(self) -> tuple[float, float]:
        config = self.vae.config
        return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H / f, W / f): the posterior mean, scaled."""
        scale, shift = self._scale()
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        out = [self.vae.encode(part.to(device, dtype)).latent_dist.mean for part in pixels.split(chunk)]
        return ((torch.cat(out) - shift) * scale).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        scale, shift = self._scale()
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        out = [self.vae.decode((part / scale + shift).to(device, dtype)).sample for part in latents.split(chunk)]
        return torch.cat(out).float().clamp(-1, 1)


def _load_text_encoder(source: str, local: bool, model_cls, tokenizer_cls):
    """A CLIP repository (files at its root) or an SD-style one (text_encoder/, tokenizer/)."""
    if local and checked_subfolders("text_encoder", Path(source), True) != [""]:  # SD-style
        return (_load("text encoder", source, model_cls.from_pretrained, subfolder="text_encoder"),
                _load("tokenizer", source, tokenizer_cls.from_pretrained, subfolder="tokenizer"))
    try:
        return (_load("text encoder", source, model_cls.from_pretrained),
                _load("tokenizer", source, tokenizer_cls.from_pretrained))
    except ModelError as first:
        if local:
            raise
        try:  # a hub id of an SD-style repository
            return (_load("text encoder", source, model_cls.from_pretrained, subfolder="text_encoder"),
                    _load("tokenizer", source, tokenizer_cls.from_pretrained, subfolder="tokenizer"))
        except ModelError:
            raise first from None
