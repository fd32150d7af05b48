"""The recipe schema: typed, torch-free dataclasses read with ``OmegaConf.structured``.

A recipe names a base model, the methods, the frame count, the resolution, the sampler and the output.
Layering (later wins): these schema defaults < the model family's defaults < the recipe YAML < typed CLI
options < ``key=value`` overrides (see :mod:`longvid.recipe.resolve`). ``None`` means "the model family
decides". Methods and stages are mappings keyed by name so that ``methods.freelong.d_s=0.3`` merges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from omegaconf import MISSING

Dtype = Literal["float32", "float16", "bfloat16"]


@dataclass
class ModelConfig:
    """Which base model to load, and how."""

    family: str = MISSING
    """Model family from the registry (``longvid models``): ``wan`` or ``animatediff``."""
    path: str = MISSING
    """Hub id (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``), a local diffusers directory, or ``tiny:<family>``
    for the built-in random-weight demo model."""
    motion_adapter: Optional[str] = None
    """AnimateDiff only: MotionAdapter hub id or directory. None when ``path`` is a saved AnimateDiff pipeline."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to load."""
    variant: Optional[str] = None
    """Which of a checkpoint's denoisers to load, for families that ship several (Pyramid Flow:
    ``diffusion_transformer_384p`` or ``diffusion_transformer_768p``). None = the family's default."""
    options: Dict[str, Any] = field(default_factory=dict)
    """Family-specific settings, checked against the family's own options (Pyramid Flow: ``image_steps``,
    ``video_steps``, ``video_guidance_scale``, ``prompt_suffix``, ``vae_tile``, the single-file ``transformer_file`` and
    ``vae_file``; see docs/models/pyramid-flow.md)."""
    dtype: Optional[Dtype] = None
    """Denoiser dtype (transformer / UNet). None = float32 on CPU; on a GPU bfloat16 (Wan) or float16 (AnimateDiff)."""
    text_encoder_dtype: Optional[Dtype] = None
    """Text-encoder dtype. None = same as ``dtype``."""
    vae_dtype: Optional[Dtype] = None
    """VAE dtype. None = float32 (Wan's model card recommends an fp32 VAE; decode memory is small)."""
    local_files_only: bool = False
    """Never reach the network; a model missing from the local cache is an error."""


@dataclass
class VideoConfig:
    """What to generate."""

    num_frames: Optional[int] = None
    """Frames of the output video. Wan needs 4k+1. None = the model's native length."""
    height: Optional[int] = None
    """Pixels; a multiple of 16 for Wan, 8 for AnimateDiff. None = family default."""
    width: Optional[int] = None
    """Pixels; see ``height``."""
    fps: Optional[int] = None
    """Frame rate written into the MP4. None = the model's native rate."""


@dataclass
class SamplerConfig:
    """The denoising loop."""

    steps: Optional[int] = None
    """Number of denoising steps. None = family default."""
    guidance_scale: Optional[float] = None
    """Classifier-free guidance scale (1 disables CFG). None = family default."""
    guidance_scale_2: Optional[float] = None
    """Wan 2.2 two-expert models: guidance for the low-noise expert. None = ``guidance_scale``."""
    scheduler: Optional[str] = None
    """A diffusers scheduler class name (``UniPCMultistepScheduler``, ``DDIMScheduler``, ...), built from the
    model's scheduler config. None = the model's own scheduler."""
    scheduler_config: Dict[str, Any] = field(default_factory=dict)
    """Scheduler config values to change (``{beta_schedule: linear, clip_sample: false}``)."""
    flow_shift: Optional[float] = None
    """Flow-matching shift (Wan: 3.0 at 480p, 5.0 at 720p). None = the model's scheduler config."""
    eta: float = 0.0
    """DDIM eta (AnimateDiff)."""
    max_sequence_length: Optional[int] = None
    """Text tokens per prompt (Wan 512, CLIP 77). None = family default."""


@dataclass
class RuntimeConfig:
    """Where and how to run."""

    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    threads: Optional[int] = None
    """CPU threads for torch. None = torch's default."""
    offload: Literal["none", "model", "sequential", "group"] = "none"
    """Keep weights in CPU memory to save GPU memory: ``model`` moves idle components, ``sequential`` every layer,
    ``group`` the denoisers' blocks one at a time (diffusers' group offloading, overlapped with compute on CUDA
    streams) with the other components on the GPU. CUDA only; a no-op on CPU."""
    layerwise_casting: Literal["none", "float8_e4m3fn", "float8_e5m2"] = "none"
    """Store the denoisers' weights in fp8 and upcast each layer to the compute dtype as it runs (diffusers'
    ``enable_layerwise_casting``; embeddings and norms stay as loaded): about half the weight memory of bf16 at
    a small loss of precision. Wan and AnimateDiff."""
    attention_backend: Optional[str] = None
    """diffusers' attention backend for the attention a method leaves as it is (``native`` SDPA by default;
    ``flash``, ``_flash_3``, ``sage``, ``xformers``, ``_native_cudnn``, … when installed): Wan. Methods' own
    kernels (flex attention, windows) are not affected."""
    compile: Literal["none", "blocks"] = "none"
    """``blocks``: ``torch.compile`` each repeated block of the denoisers once (diffusers' regional compilation,
    ``compile_repeated_blocks``): faster steps after a one-time compile at the first step. Wan."""
    vae_tiling: bool = False
    """Decode (and encode pixel hand-offs) in overlapping spatial tiles, as diffusers' ``vae.enable_tiling()``,
    still streamed frame by frame (Wan): bounds VAE memory at 1080p and 4K; frames equal diffusers' tiled ones."""
    decode_chunk: int = 16
    """Frames per VAE decode batch for 2D VAEs (AnimateDiff). Wan decodes one latent frame at a time."""
    checkpoint: Literal["off", "on_signal", "every_n"] = "off"
    """Resumable runs: ``on_signal`` writes a checkpoint when SIGTERM/SIGUSR1 arrives (after the current step)
    and exits with code 75; ``every_n`` also writes one every ``checkpoint_every`` steps. A rerun of the same
    command resumes from ``<output dir>/.<name>.ckpt/``, bit-identically."""
    checkpoint_every: int = 10
    """Steps between checkpoints with ``checkpoint: every_n``."""
    limits: bool = True
    """Refuse values that would exhaust memory or time (more than 2049 frames, sides above 4096 px, more
    than 1000 steps, ...; see docs/recipes.md). false lifts them."""


@dataclass
class OutputConfig:
    """Where the MP4 and its JSON sidecar go."""

    dir: str = "outputs"
    """Output folder (created if missing)."""
    name: str = "{recipe}-{prompt}-{seed}"
    """File-name template. Fields: {recipe} {prompt} {seed} {frames} {width} {height} {date} {time}."""
    codec: Literal["libx264", "libx265", "ffv1"] = "libx264"
    """Video codec. ``ffv1`` writes a lossless ``.mkv`` (for metrics)."""
    crf: int = 18
    """Constant rate factor (lower = better, 0-51) for libx264/libx265."""
    preset: str = "medium"
    """x264/x265 speed preset."""
    threads: int = 4
    """Encoder threads. Fixed (not "all CPUs") because x264's output depends on it: the same recipe gives the
    same file on any machine."""
    overwrite: bool = False
    """Replace an existing file of the same name (else it is an error)."""
    save_latents: bool = False
    """Also save the final latents as ``<name>.latents.pt``."""
    preview: bool = False
    """Also write a contact sheet ``<name>.preview.png`` (every k-th frame, k = frames // 8, four per row), published
    with the video."""
    crop: Optional[List[int]] = None
    """``[height, width]``: write a centred crop of every frame (``[1080, 1920]`` from a 1088×1920 generation, as
    Wan sizes are multiples of 16). None = the whole frame."""


@dataclass
class StageSamplerConfig:
    """A stage's changes to the recipe's ``sampler``; every unset (null) key keeps the recipe's value."""

    steps: Optional[int] = None
    """Steps of the full schedule this stage's ``strength`` starts into."""
    guidance_scale: Optional[float] = None
    guidance_scale_2: Optional[float] = None
    scheduler: Optional[str] = None
    scheduler_config: Optional[Dict[str, Any]] = None
    """Replaces the recipe's ``sampler.scheduler_config`` as a whole."""
    flow_shift: Optional[float] = None
    eta: Optional[float] = None


@dataclass
class StageConfig:
    """One stage of a coarse-to-fine plan (``stages.<name>``). Unset sizes are the ``video`` sizes.

    The first stage generates from noise; each later stage takes the previous stage's result, enlarges it
    (``upsample``), re-noises it to the point ``strength`` of its schedule and denoises from there.
    """

    height: Optional[int] = None
    """Pixels; at least the previous stage's. The last stage's size is the output's (``video.height``)."""
    width: Optional[int] = None
    """Pixels; see ``height``."""
    num_frames: Optional[int] = None
    """Frames; may differ from the previous stage's only with ``upsample: latent``."""
    sampler: StageSamplerConfig = field(default_factory=StageSamplerConfig)
    strength: float = 1.0
    """How much of the schedule runs, in (0, 1]: 1 = from pure noise; 0.7 of 50 steps = the last 35, after
    re-noising the hand-off to that point (diffusers' video-to-video rule). The first stage must use 1."""
    upsample: Literal["pixel", "latent"] = "pixel"
    """Hand-off from the previous stage: ``pixel`` = decode, resize, encode (posterior mode), streamed chunk by
    chunk; ``latent`` = resize the latents."""
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    """Resize filter of the hand-off (``bilinear`` is trilinear for latents that also change frame count)."""


@dataclass
class Recipe:
    """A whole generation."""

    name: str = ""
    """Recipe name (used in output names). Set from the file name when empty."""
    description: str = ""
    """One line on what this recipe does."""
    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    prompt: Any = ""
    """A prompt, or ``{frame: prompt}`` for multi-prompt methods (FreeNoise)."""
    negative_prompt: str = ""
    """Negative prompt for classifier-free guidance."""
    image: Optional[str] = None
    """Image-to-video: the path of the first frame, for families that generate from an image (Pyramid Flow). It is
    scaled to cover the video size and centre-cropped. Checked (exists, decodes) before any model loads."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    """Seed of the torch generator that draws the initial noise (and any method randomness)."""
    methods: Dict[str, Any] = field(default_factory=dict)
    """Long-video methods keyed by name (``longvid methods``), each with its own settings; null disables one."""
    stages: Dict[str, Any] = field(default_factory=dict)
    """Coarse-to-fine plan: an ordered mapping of stages (:class:`StageConfig`), run in order. Empty = one stage
    at the ``video`` size with ``sampler``."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
