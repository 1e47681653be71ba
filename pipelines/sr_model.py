"""The super-resolution component of a crispdiff pipeline, one file past 500 lines because saved folders carry a copy
of it: any spandrel-supported SR network as a diffusers model.

Why this file exists on its own: a saved pipeline folder carries a copy of it in ``sr_model/sr_model.py`` and names it
in ``model_index.json`` as ``["sr_model", "SpandrelSRModel"]``, so ``DiffusionPipeline.from_pretrained(dir,
trust_remote_code=True)`` can rebuild the component on a machine where crispdiff is not installed. It therefore imports
only torch, diffusers, spandrel and safetensors, and loads without spandrel too: the component then has no network,
the pipeline samples at its native size, and asking it to upscale says what to install.

Why spandrel: the original Real-ESRGAN / BasicSR packages no longer import with current torchvision, while spandrel
recognises dozens of SR architectures (RRDBNet, SRVGGNetCompact, SwinIR, HAT, ...) from a plain state dict. The
wrapper therefore stores no architecture hyper-parameters of its own: the weights file keeps the keys spandrel detects,
and loading re-detects the network from it. The config only records what was detected (for display and as a check)
and how to run it (tiling).

Running is conservative on purpose (sharp output without invented detail): ``upscale`` blends the SR output with a
Lanczos upscale of the same image (``sr_strength``), and large inputs are processed in overlapping, feathered tiles so
memory stays bounded.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import _get_model_file, logging
from safetensors.torch import load_file, save_file

logger = logging.get_logger(__name__)

try:
    import spandrel
except ImportError:  # a machine with only diffusers: the pipeline still loads, upscaling says what to install
    spandrel = None

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MODULE_FILE = "sr_model.py"
DEFAULT_TILE_SIZE = 256
DEFAULT_TILE_OVERLAP = 32
STATE_DICT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
USABLE_PURPOSES = ("SR", "Restoration")
SPANDREL_MISSING = "pip install spandrel, or sample with upscale=False"
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


class SRModelError(ValueError):
    """A file or folder that cannot be used as an SR component; the message names it and says what to do."""


# --------------------------------------------------------------------------------------------------------------------
# Lanczos resampling (the conservative baseline the SR output is blended with)
# --------------------------------------------------------------------------------------------------------------------


def lanczos_matrix(in_size: int, out_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The ``[out_size, in_size]`` float64 matrix of 1-D Lanczos-3 weights on ``device`` (cached per size pair)."""
    return _lanczos_matrix_cpu(in_size, out_size).to(device=device)


@functools.lru_cache(maxsize=32)
def _lanczos_matrix_cpu(in_size: int, out_size: int) -> torch.Tensor:
    """The ``[out_size, in_size]`` matrix of 1-D Lanczos-3 weights, the same weights PIL's ``Image.LANCZOS`` uses.

    Why a matrix instead of PIL: the pipeline's images live on the GPU in batches; a separable matmul keeps them there
    and matches PIL's float ("F" mode) resize to ~1e-7 (tested). Like PIL, the kernel is widened by the downscale
    factor (antialiasing) and renormalised where it is cut off at the borders.
    """
    scale = in_size / out_size
    widen = max(scale, 1.0)
    support = 3.0 * widen
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = (torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) / widen
        row = torch.where(taps.abs() < 3.0, torch.sinc(taps) * torch.sinc(taps / 3.0), torch.zeros_like(taps))
        total = row.sum()
        weights[i, lo:hi] = row / total if total != 0 else row
    return weights


def lanczos_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[B, C, h, w]`` images to ``size = (H, W)`` with Lanczos-3, unclamped, in the input's dtype.

    Computed in float32 (float64 for float64 input) so half-precision inputs do not lose the blend's precision.
    """
    height, width = size
    if images.shape[-2:] == (height, width):
        return images.clone()
    compute = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(compute)
    rows = lanczos_matrix(images.shape[-2], height, images.device).to(compute)
    cols = lanczos_matrix(images.shape[-1], width, images.device).to(compute)
    out = torch.matmul(torch.matmul(rows, x), cols.T)
    return out.to(images.dtype)


def normalize_size(output_size: int | tuple[int, int] | list[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    """``None`` -> ``default``; an int -> a square; a pair -> ``(height, width)``. Rejects non-positive sizes."""
    if output_size is None:
        return default
    if isinstance(output_size, int):
        size = (output_size, output_size)
    else:
        size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"output_size must be a positive int or (height, width), got {output_size!r}")
    return size  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` pixels shared.

    Tiles are spread evenly (no thin last tile) and starts are multiples of ``align`` so networks that work on
    blocks (pixel-unshuffle, attention windows) see the same grid in every tile as in the whole image.
    """
    if length <= tile:
        return [0]
    reach = overlap + align - 1
    if tile <= reach:
        raise ValueError(f"tile size {tile} must exceed the overlap {overlap} (+ alignment {align - 1})")
    count = math.ceil((length - reach) / (tile - reach))
    span = length - tile
    starts = sorted({(round(i * span / (count - 1)) // align) * align for i in range(count)})
    starts[-1] = span
    return starts


def edge_ramp(length: int, overlap: float, left: bool, right: bool) -> torch.Tensor:
    """Blend weights along one axis of a tile of ``length`` output pixels.

    At an edge shared with a neighbouring tile the weight is 0 for the outer quarter of the overlap (where the tile's
    own output is distorted by its border), rises linearly over the middle half and is 1 beyond. Two neighbours'
    ramps sum to 1 across their overlap, so a network whose receptive field radius is at most ``overlap / 4`` gives
    exactly the untiled result, and any other network gets seamless feathering instead of hard seams.
    """
    weight = torch.ones(length, dtype=torch.float32)
    if overlap <= 0:
        return weight
    centers = torch.arange(length, dtype=torch.float32) + 0.5
    margin, width = overlap / 4.0, overlap / 2.0
    if left:
        weight = weight * ((centers - margin) / width).clamp(0.0, 1.0)
    if right:
        weight = weight * ((length - centers - margin) / width).clamp(0.0, 1.0)
    return weight


# --------------------------------------------------------------------------------------------------------------------
# Reading state dicts safely and detecting the architecture
# --------------------------------------------------------------------------------------------------------------------


def supported_architectures() -> list[str]:
    """Names of the architecture families spandrel can detect (image-to-image ones are usable here)."""
    return sorted({support.architecture.name for support in spandrel.MAIN_REGISTRY.architectures()})


def _families_hint() -> str:
    return "supported families (spandrel " + spandrel.__version__ + "): " + ", ".join(supported_architectures())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` / ``.pt`` / ``.ckpt`` / ``.safetensors`` file into a canonical state dict, never unpickling code.

    Why ``weights_only=True``: ``.pth`` files are pickles and a pickle can run arbitrary code; the restricted loader
    accepts only tensors and containers. Wrappers such as Real-ESRGAN's ``params_ema`` / ``params`` are unwrapped by
    spandrel's canonicalisation; non-tensor entries (iteration counters, optimiser names) are dropped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in STATE_DICT_SUFFIXES:
        raise SRModelError(
            f"{path}: unsupported SR model file type {suffix or '(none)'!r}; expected one of "
            f"{', '.join(STATE_DICT_SUFFIXES)} holding a state dict"
        )
    if not path.is_file():
        raise SRModelError(f"{path}: SR model file not found")
    try:
        if suffix == ".safetensors":
            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, bad headers, refused globals: all mean 'not a readable state dict'
        raise SRModelError(
            f"{path}: cannot read the SR model file ({type(err).__name__}: {err}). The file is corrupt, truncated, or "
            "not a plain state dict (pickled modules and TorchScript archives are refused for safety; re-save it "
            "with torch.save(model.state_dict(), ...) or as .safetensors)"
        ) from err
    if not isinstance(raw, Mapping):
        raise SRModelError(f"{path}: expected a state dict (a mapping of names to tensors), found {type(raw).__name__}")
    canonical = spandrel.canonicalize_state_dict(dict(raw))
    state = {k: v for k, v in canonical.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise SRModelError(f"{path}: the file holds no tensors, so it is not a model state dict")
    return state


def detect(state_dict: Mapping[str, torch.Tensor], source: str) -> spandrel.ImageModelDescriptor:
    """Let spandrel recognise the architecture, and refuse what cannot serve as an RGB image-to-image SR step."""
    try:
        descriptor = spandrel.MAIN_REGISTRY.load(dict(state_dict))
    except spandrel.UnsupportedModelError as err:
        raise SRModelError(
            f"{source}: no known super-resolution architecture matches this state dict; {_families_hint()}"
        ) from err
    except (RuntimeError, KeyError, ValueError, IndexError, AssertionError, TypeError) as err:
        raise SRModelError(
            f"{source}: the state dict looks like a known architecture but does not load "
            f"({type(err).__name__}: {err}); the file is probably corrupt or truncated"
        ) from err
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise SRModelError(
            f"{source}: {descriptor.architecture.name} is not an image-to-image model "
            f"(purpose {descriptor.purpose}); an SR step needs one"
        )
    if descriptor.purpose not in USABLE_PURPOSES:
        raise SRModelError(
            f"{source}: {descriptor.architecture.name} is a {descriptor.purpose} model "
            f"(needs aligned inputs); use a general SR or restoration model"
        )
    channels = (descriptor.input_channels, descriptor.output_channels)
    if channels not in {(3, 3), (1, 1), (4, 4), (4, 3)}:
        raise SRModelError(
            f"{source}: {descriptor.architecture.name} maps {channels[0]} to {channels[1]} channels; "
            "only RGB, grayscale and RGBA models can process RGB samples"
        )
    return descriptor


def _write_atomically(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then ``os.replace``, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------------------
# The component
# --------------------------------------------------------------------------------------------------------------------


class SpandrelSRModel(ModelMixin, ConfigMixin):
    """A spandrel-detected SR network as a diffusers component; call ``upscale`` on ``[0, 1]`` RGB images.

    Build one with ``from_single_file(path)`` (a ``.pth`` / ``.safetensors`` state dict), ``from_descriptor`` (an
    already loaded spandrel model) or ``from_pretrained(folder)`` (a folder written by ``save_pretrained``). The
    constructor alone gives an empty shell: the network only exists once weights are attached.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        architecture: str = "",
        architecture_name: str = "",
        scale: int = 1,
        input_channels: int = 3,
        output_channels: int = 3,
        purpose: str = "SR",
        tags: list[str] | None = None,
        supports_half: bool = False,
        supports_bfloat16: bool = False,
        size_minimum: int = 0,
        size_multiple_of: int = 1,
        size_square: bool = False,
        tiling: str = "supported",
        tile_size: int | None = DEFAULT_TILE_SIZE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        source: str | None = None,
        spandrel_version: str = "",
    ):
        super().__init__()
        _check_tiling(tile_size, tile_overlap)
        self.net: torch.nn.Module | None = None
        self._descriptor: spandrel.ImageModelDescriptor | None = None

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_descriptor(
        cls,
        descriptor: spandrel.ImageModelDescriptor,
        *,
        tile_size: int | None = DEFAULT_TILE_SIZE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        source: str | None = None,
    ) -> SpandrelSRModel:
        """Wrap a loaded spandrel model, recording what spandrel detected in the config."""
        size_req = descriptor.size_requirements
        model = cls(
            architecture=str(descriptor.architecture.id),
            architecture_name=descriptor.architecture.name,
            scale=int(descriptor.scale),
            input_channels=int(descriptor.input_channels),
            output_channels=int(descriptor.output_channels),
            purpose=str(descriptor.purpose),
            tags=list(descriptor.tags),
            supports_half=bool(descriptor.supports_half),
            supports_bfloat16=bool(descriptor.supports_bfloat16),
            size_minimum=int(size_req.minimum),
            size_multiple_of=int(size_req.multiple_of),
            size_square=bool(size_req.square),
            tiling=descriptor.tiling.name.lower(),
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            source=source,
            spandrel_version=spandrel.__version__,
        )
        model._attach(descriptor)
        return model

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], *, source: str = "<state dict>", **options: Any
    ) -> SpandrelSRModel:
        """Detect the architecture of an in-memory state dict (original key names or spandrel's) and wrap it."""
        state = spandrel.canonicalize_state_dict(dict(state_dict))
        return cls.from_descriptor(detect(state, source), source=source, **options)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, **options: Any) -> SpandrelSRModel:
        """Load a ``.pth`` / ``.pt`` / ``.ckpt`` / ``.safetensors`` state dict, e.g. ``RealESRGAN_x4plus.pth``."""
        state = read_state_dict(path)
        options.setdefault("source", Path(path).name)
        return cls.from_descriptor(detect(state, str(path)), **options)

    def _attach(self, descriptor: spandrel.ImageModelDescriptor) -> None:
        """Register the spandrel network as the ``net`` submodule; inference only, so gradients are switched off."""
        self.net = descriptor.model.to(memory_format=torch.channels_last)  # NHWC convolutions: faster on a CPU
        self._descriptor = descriptor
        self.net.eval()
        self.net.requires_grad_(False)

    # ---- saving and loading -------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs: Any) -> None:
        """Write ``config.json``, the weights as safetensors, and a copy of this module file.

        The weights keep the network's own key names so spandrel (and chaiNNer, ComfyUI, ...) re-detect the file;
        that is checked before anything is written. ``kwargs`` from diffusers (``safe_serialization``, ``variant``,
        ``max_shard_size``, ...) are accepted and ignored: the weights are always one safetensors file.
        """
        if not is_main_process:
            return
        self._require_net()
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.net.state_dict().items()}
        self._check_redetects(state)
        metadata = {"format": "pt", "architecture": self.config.architecture, "scale": str(self.config.scale)}
        _write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=metadata))
        _write_atomically(folder / self.config_name, lambda tmp: Path(tmp).write_text(self.to_json_string()))
        source_code = Path(__file__).read_text(encoding="utf-8")
        _write_atomically(folder / MODULE_FILE, lambda tmp: Path(tmp).write_text(source_code, encoding="utf-8"))

    def _check_redetects(self, state: Mapping[str, torch.Tensor]) -> None:
        """Refuse to save weights that spandrel would not recognise as the same architecture again."""
        for support in spandrel.MAIN_REGISTRY.architectures("detection"):
            if support.detect(dict(state)):
                if str(support.architecture.id) != self.config.architecture:
                    raise SRModelError(
                        f"saving would be detected as {support.architecture.id}, not {self.config.architecture}; "
                        "refusing to write a component that would reload as another network"
                    )
                return
        raise SRModelError(f"the {self.config.architecture} weights are not detectable by spandrel after saving")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device_map: Any = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        **kwargs: Any,
    ) -> SpandrelSRModel:
        """Rebuild the component from a folder (or Hub repo) written by ``save_pretrained``.

        Accepts the keyword arguments diffusers' pipeline loader passes: ``torch_dtype`` is honoured (kept at float32,
        with a warning, for architectures that do not support it, so a float16 pipeline still loads), a device-like
        ``device_map`` moves the model; the rest (``low_cpu_mem_usage``, ``variant``, ...) does not apply here.
        Hub options (``cache_dir``, ``token``, ``revision``, ``local_files_only``, ...) are forwarded for repo ids.
        """
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        where = f"{pretrained_model_name_or_path}" + (f"/{subfolder}" if subfolder else "")
        if spandrel is None:
            logger.warning(f"{where}: spandrel is not installed, so this pipeline cannot upscale ({SPANDREL_MISSING})")
            return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub))
        try:
            config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub)
            weights = _get_model_file(
                pretrained_model_name_or_path, weights_name=WEIGHTS_NAME, subfolder=subfolder, **hub
            )
        except (OSError, ValueError) as err:
            raise SRModelError(
                f"{where}: not a saved SR component (needs {cls.config_name} and {WEIGHTS_NAME}): {err}"
            ) from err
        state = read_state_dict(weights)
        descriptor = detect(state, str(weights))
        _check_matches_config(descriptor, config, where)
        model = cls.from_descriptor(
            descriptor,
            tile_size=config.get("tile_size", DEFAULT_TILE_SIZE) if tile_size is None else tile_size,
            tile_overlap=config.get("tile_overlap", DEFAULT_TILE_OVERLAP) if tile_overlap is None else tile_overlap,
            source=config.get("source"),
        )
        if torch_dtype is not None:
            model._cast_if_supported(torch_dtype)
        device = _device_from_map(device_map)
        if device is not None:
            model.to(device)
        return model

    def _cast_if_supported(self, dtype: torch.dtype) -> None:
        """Cast the weights unless the architecture cannot run in ``dtype`` (then stay float32 and say so)."""
        if not self.dtype_supported(dtype):
            logger.warning(f"{self.config.architecture_name} does not support {dtype}; keeping the SR model float32")
            return
        self.to(dtype)

    def to(self, *args: Any, **kwargs: Any) -> SpandrelSRModel:
        """``nn.Module.to``, except that a dtype the architecture cannot run in is refused with a warning.

        Why: ``pipe.to("cuda", torch.float16)`` casts every component; SwinIR in float16 gives wrong images, so the SR
        component stays float32 (the pipeline casts its input) instead of breaking the whole pipeline.
        """
        model = super().to(*args, **kwargs)
        if self.net is not None:
            dtype = next(self.net.parameters()).dtype
            if not self.dtype_supported(dtype):
                logger.warning(f"{self.config.architecture_name} does not support {dtype}; keeping it float32")
                super().to(torch.float32)
        return model

    def dtype_supported(self, dtype: torch.dtype) -> bool:
        """Whether the architecture is known to run correctly in ``dtype``."""
        if dtype == torch.float16:
            return bool(self.config.supports_half)
        if dtype == torch.bfloat16:
            return bool(self.config.supports_bfloat16)
        return dtype in (torch.float32, torch.float64)

    # ---- running ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The network's device; an empty shell (no spandrel here) reports the CPU so the pipeline still works."""
        return super().device if self.net is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return super().dtype if self.net is not None else torch.float32

    @property
    def descriptor(self) -> spandrel.ImageModelDescriptor:
        """The spandrel model descriptor (architecture, tags, size requirements)."""
        self._require_net()
        return self._descriptor  # type: ignore[return-value]

    def output_size_for(self, height: int, width: int) -> tuple[int, int]:
        """The network's native output size for an input of ``height`` x ``width``."""
        return height * self.config.scale, width * self.config.scale

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """Run the SR network on ``[B, 3, h, w]`` images in [0, 1]; returns ``[B, 3, h*scale, w*scale]`` in [0, 1].

        Inputs larger than ``tile_size`` on a side are processed in overlapping tiles whose outputs are feathered
        together (see ``edge_ramp``); for convolutional networks whose receptive-field radius is at most
        ``tile_overlap / 4`` input pixels the tiled result equals the untiled one up to float rounding.
        """
        self._require_net()
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected RGB images shaped [B, 3, H, W], got {tuple(images01.shape)}")
        net_dtype = self._net_dtype()
        x = images01.to(net_dtype)
        tile = self.config.tile_size
        if tile and max(x.shape[-2:]) > tile:
            out = self._run_tiled(x, int(tile), int(self.config.tile_overlap))
        else:
            out = self._run_rgb(x).clone()
        return out.to(images01.dtype).clamp_(0.0, 1.0)

    @torch.no_grad()
    def upscale(
        self,
        images01: torch.Tensor,
        sr_strength: float = 1.0,
        output_size: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """SR-upscale ``[B, 3, h, w]`` images in [0, 1], blended with Lanczos by ``sr_strength``, clamped to [0, 1].

        ``sr_strength`` 0 returns exactly the Lanczos upscale (the network is not run), 1 the SR output; values in
        between limit the detail the SR model invents. ``output_size`` (int = square, or ``(H, W)``) resizes to an
        exact target: the SR output is Lanczos-resized to it and the baseline is resized straight from the input.
        """
        if not 0.0 <= float(sr_strength) <= 1.0:
            raise ValueError(f"sr_strength must be in [0, 1], got {sr_strength}")
        if images01.ndim != 4:
            raise ValueError(f"expected images shaped [B, 3, H, W], got {tuple(images01.shape)}")
        target = normalize_size(output_size, self.output_size_for(*images01.shape[-2:]))
        if sr_strength == 0:
            return lanczos_resize(images01, target).clamp_(0.0, 1.0)
        sr = lanczos_resize(self.forward(images01), target)
        if sr_strength == 1:
            return sr.clamp_(0.0, 1.0)
        base = lanczos_resize(images01, target)
        return torch.lerp(base, sr, float(sr_strength)).clamp_(0.0, 1.0)

    def _require_net(self) -> None:
        if spandrel is None:
            raise SRModelError(f"the SR component needs spandrel: {SPANDREL_MISSING}")
        if self.net is None or self._descriptor is None:
            raise SRModelError("this SpandrelSRModel has no network; build it with from_single_file / from_pretrained")

    def _net_dtype(self) -> torch.dtype:
        """The weights' dtype, refusing one the architecture cannot run in (e.g. SwinIR in float16)."""
        dtype = next(self.net.parameters()).dtype
        if not self.dtype_supported(dtype):
            raise SRModelError(
                f"{self.config.architecture_name} does not support {dtype}; keep the SR component in float32"
                + (" or bfloat16" if self.config.supports_bfloat16 else "")
                + ", e.g. pipe.sr_model.to(torch.float32)"
            )
        return dtype

    def _run_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the network on RGB input, adapting grayscale / RGBA models; spandrel pads to its size needs."""
        channels = self.config.input_channels
        x = x.contiguous(memory_format=torch.channels_last)
        if channels == 1:
            batch, _, height, width = x.shape
            out = self._descriptor(x.reshape(batch * 3, 1, height, width))
            return out.reshape(batch, 3, *out.shape[-2:])
        if channels == 4:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return self._descriptor(x)[:, :3]

    def _run_tiled(self, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """Run the network tile by tile and feather the tiles together; memory is bounded by one tile's activations."""
        align = max(int(self.config.size_multiple_of), 1)
        tile = max((tile // align) * align, int(self.config.size_minimum), align)
        batch, _, height, width = x.shape
        pad_h, pad_w = (-height) % align, (-width) % align
        if pad_h or pad_w:
            x = _pad_like_spandrel(x, pad_h, pad_w)
        full_h, full_w = x.shape[-2:]
        tile_h, tile_w = min(tile, full_h), min(tile, full_w)
        scale = int(self.config.scale)
        ys = tile_starts(full_h, tile_h, overlap, align)
        xs = tile_starts(full_w, tile_w, overlap, align)
        out = torch.zeros(batch, 3, full_h * scale, full_w * scale, dtype=torch.float32, device=x.device)
        norm = torch.zeros(full_h * scale, full_w * scale, dtype=torch.float32, device=x.device)
        for y0 in ys:
            ramp_y = edge_ramp(tile_h * scale, overlap * scale, y0 > 0, y0 + tile_h < full_h).to(x.device)
            for x0 in xs:
                ramp_x = edge_ramp(tile_w * scale, overlap * scale, x0 > 0, x0 + tile_w < full_w).to(x.device)
                weight = ramp_y[:, None] * ramp_x[None, :]
                piece = self._run_rgb(x[:, :, y0 : y0 + tile_h, x0 : x0 + tile_w]).float()
                rows = slice(y0 * scale, (y0 + tile_h) * scale)
                cols = slice(x0 * scale, (x0 + tile_w) * scale)
                out[:, :, rows, cols] += piece * weight
                norm[rows, cols] += weight
        out = out / norm
        return out[:, :, : height * scale, : width * scale].to(x.dtype)


def _pad_like_spandrel(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad bottom/right as spandrel does for size requirements (reflect, then replicate), so tiling sees the same."""
    reflect_w, reflect_h = min(pad_w, x.shape[-1] - 1), min(pad_h, x.shape[-2] - 1)
    x = F.pad(x, (0, reflect_w, 0, reflect_h), mode="reflect")
    if pad_w > reflect_w or pad_h > reflect_h:
        x = F.pad(x, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return x


def _check_tiling(tile_size: int | None, tile_overlap: int) -> None:
    """Tiles must be positive and the overlap at most half a tile (so each pixel's blend involves two tiles)."""
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")
    if tile_size is not None and tile_size != 0 and (tile_size < 8 or 2 * tile_overlap > tile_size):
        raise ValueError(
            f"tile_size must be >= 8 and at least twice tile_overlap, got {tile_size} / {tile_overlap}"
            " (use tile_size=0 or None to disable tiling)"
        )


def _check_matches_config(descriptor: spandrel.ImageModelDescriptor, config: Mapping[str, Any], where: str) -> None:
    """The weights must re-detect as what the config says; a mismatch means files from different models were mixed."""
    expected = (config.get("architecture"), config.get("scale"))
    found = (str(descriptor.architecture.id), int(descriptor.scale))
    if expected[0] and expected != found:
        raise SRModelError(
            f"{where}: config.json describes {expected[0]} x{expected[1]} but the weights are "
            f"{found[0]} x{found[1]}; the folder mixes files from different SR models"
        )


def _device_from_map(device_map: Any) -> torch.device | None:
    """A single device from diffusers' ``device_map`` when it names one (``"cuda"``, ``{"": "cuda:0"}``), else None."""
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced", "sequential"):
        return torch.device(device_map)
    if isinstance(device_map, Mapping) and set(device_map) == {""}:
        return torch.device(device_map[""])
    return None


def describe_config(config: Mapping[str, Any]) -> str:
    """One line for logs and model cards: ``ESRGAN x4 (64nf, 23nb); fp16: yes, bf16: yes; tiles 256 px / 32 px``."""
    tags = ", ".join(config.get("tags") or [])
    tile = config.get("tile_size")
    tiling = f"tiles {tile} px with {config.get('tile_overlap')} px overlap" if tile else "untiled"
    return (
        f"{config.get('architecture_name') or config.get('architecture')} x{config.get('scale')}"
        + (f" ({tags})" if tags else "")
        + f"; fp16: {'yes' if config.get('supports_half') else 'no'}, "
        f"bf16: {'yes' if config.get('supports_bfloat16') else 'no'}; {tiling}"
    )
