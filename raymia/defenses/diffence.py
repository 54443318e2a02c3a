"""DIFFENCE (Peng, Naseh & Houmansadr, NDSS 2025): regenerate each query with a diffusion model before the
classifier sees it, and release the confidence vector of ONE label-preserving regeneration.

For a batch of queries x (images in [0, 1]):

1. N candidates per query: forward-noise to step T' and denoise back with DDIM (default: a single jump
   T' -> 0, i.e. one UNet call per candidate; the official code's extra 160 -> 160 call is an exact identity
   and is skipped; ``ddim_steps > 1`` gives a multi-step DDIM). Noise mode ``paper``: the textbook
   x_T' = sqrt(ᾱ_T') x + sqrt(1 - ᾱ_T') ε; ``reference``: the official code's x / sqrt(ᾱ_{T'-1}) +
   sqrt(1/ᾱ_{T'-1} - 1) ε, conditioned on T'. All N·B candidates go through the UNet together (in chunks of
   ``chunk`` images), then through the classifier together.
2. Candidates = [regenerations..., original] (the original last, always present). Keep those whose
   predicted label equals the original's.
3. Select by the top-1 scaled logit φ = log p_top - log Σ_others p:
   - scenario 1: the first kept candidate with φ in [a, b], where [a, b] minimises the Jensen-Shannon distance
     between the selected φ of known members and known non-members (a search over a grid of φ values);
   - scenario 2: the same rule with [a, b] = [min, mean] of the known members' candidate φ;
   - scenario 3: a uniformly random kept regeneration (the original if none is kept);
   with the fallback of the kept candidate closest to (a + b) / 2.
4. Release softmax of the chosen candidate's logits. Its label is the original label by construction.

Known members / non-members are the defender-held calibration splits, never audited samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.spatial.distance import jensenshannon
from torch import nn

from raymia.attacks.lira import log_odds
from raymia.diffusion.model import to_data_range, to_model_range
from raymia.diffusion.sampling import ddim_step


class DiffenceConfig(BaseModel):
    """DIFFENCE's knobs, declared once: the audit (``diffence:``) and the Serve deployment (``user_config``)
    both extend this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(30, ge=0, description="candidates per query (0: the undefended output)")
    t_prime: int = Field(160, ge=1, description="forward-noising step T' of the 1000-step schedule")
    ddim_steps: int = Field(1, ge=1, description="reverse DDIM steps from T' to 0 (1: a single jump)")
    scenario: Literal[1, 2, 3] = 1
    noise_mode: Literal["paper", "reference"] = "paper"
    grid_points: int = Field(20, ge=2, description="scenario 1: steps of the [a, b] search grid")
    js_bins: int = Field(100, ge=10)
    chunk: int | Literal["auto"] = Field("auto", description="most images per UNet / classifier call "
                                         "(auto: 512 on a CPU, where larger calls fall out of cache; 4096 on a GPU)",
                                         json_schema_extra={"changes_output": False})
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="the UNet's precision (auto: bf16 on a "
                                                       "GPU, fp32 on a CPU); the classifier always runs in fp32")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the UNet (auto: on a GPU only; on a "
                                            "CPU it needs a C++ compiler and recompiles for new batch sizes)",
                                            json_schema_extra={"changes_output": False})
    seed: int = 0

    @classmethod
    def output_knob_names(cls) -> tuple[str, ...]:
        """The knobs that change what DIFFENCE releases (chunking and compilation do not, up to rounding)."""
        return tuple(name for name, f in DiffenceConfig.model_fields.items()
                     if (f.json_schema_extra or {}).get("changes_output", True))

    def output_knobs(self) -> dict[str, object]:
        """``{knob: value}`` for :meth:`output_knob_names`: what a cache key or a logged protocol must record."""
        return {name: getattr(self, name) for name in self.output_knob_names()}


def query_seed(service_seed: int, x: np.ndarray) -> int:
    """A 31-bit seed from the service seed and the query's float32 bytes."""
    digest = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes() + service_seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest()[:4], "little") & 0x7FFFFFFF


def noised(x0: torch.Tensor, t_prime: int, abar: torch.Tensor, noise: torch.Tensor, mode: str) -> torch.Tensor:
    """x_T' from x0 in model range [-1, 1]: the textbook q-sample (``paper``) or the official code's (``reference``)."""
    if mode == "paper":
        a = abar[t_prime]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise
    a = abar[t_prime - 1]
    return x0 / a.sqrt() + (1 / a - 1).sqrt() * noise


def ddim_denoise(unet: nn.Module, x_t: torch.Tensor, t_prime: int, abar: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from step T' down to 0 in ``steps`` jumps (:func:`ddim_step`), one UNet call
    per jump."""
    ts = np.linspace(t_prime, 0, steps + 1).round().astype(int)
    x = x_t
    for t, s in zip(ts[:-1], ts[1:]):
        eps = unet(x, torch.full((len(x),), int(t), device=x.device)).sample
        x = ddim_step(x, eps, int(t), int(s), abar)
    return x


def top1_log_odds(logits: np.ndarray) -> np.ndarray:
    """φ ``[...]`` of candidate logits ``[..., C]`` with respect to each candidate's own top-1 class."""
    return log_odds(logits, logits.argmax(-1))


def select(cand: np.ndarray, interval: tuple[float, float] | None, rng: np.random.Generator | None = None,
           phi: np.ndarray | None = None) -> np.ndarray:
    """Index ``[B]`` of the released candidate among ``cand [B, N+1, C]`` (original last).

    With an interval: the first label-preserving candidate whose φ lies in [a, b], else the label-preserving
    candidate closest to (a+b)/2. Without (scenario 3): a uniformly random label-preserving regeneration, else
    the original.
    """
    b, m, _ = cand.shape
    kept = cand.argmax(-1) == cand[:, -1:].argmax(-1)  # [B, N+1]; the original (last) is always kept
    if interval is None:
        rng = rng or np.random.default_rng(0)
        gen_kept = kept[:, :-1]
        choice = np.full(b, m - 1)
        for i in np.flatnonzero(gen_kept.any(axis=1)):
            choice[i] = rng.choice(np.flatnonzero(gen_kept[i]))
        return choice
    lo, hi = interval
    phi = top1_log_odds(cand) if phi is None else phi
    inside = kept & (phi >= lo) & (phi <= hi)
    closest = np.where(kept, np.abs(phi - (lo + hi) / 2), np.inf).argmin(axis=1)
    return np.where(inside.any(axis=1), inside.argmax(axis=1), closest)


def _selected_phi(cand: np.ndarray, phi: np.ndarray, interval: tuple[float, float]) -> np.ndarray:
    return phi[np.arange(len(cand)), select(cand, interval, phi=phi)]


def js_distance(phi_mem: np.ndarray, phi_non: np.ndarray, bins: int) -> float:
    """Jensen-Shannon distance of the two φ histograms over ``bins`` bins spanning the non-member range."""
    lo, hi = float(phi_non.min()), float(phi_non.max())
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    h_mem = np.maximum(np.histogram(np.clip(phi_mem, lo, hi), edges)[0].astype(float), 1e-19)
    h_non = np.maximum(np.histogram(phi_non, edges)[0].astype(float), 1e-19)
    return float(jensenshannon(h_mem, h_non))


def search_interval(cand_mem: np.ndarray, cand_non: np.ndarray, cfg: DiffenceConfig) -> tuple[float, float]:
    """Scenario 1: the grid pair a < b minimising the JS distance between selected member / non-member φ;
    scenario 2: [min, mean] of the members' label-preserving regenerations' φ."""
    def gen_phi(cand: np.ndarray) -> np.ndarray:
        kept = (cand.argmax(-1) == cand[:, -1:].argmax(-1))[:, :-1]
        return top1_log_odds(cand[:, :-1])[kept]
    phi_mem, phi_non = gen_phi(cand_mem), gen_phi(cand_non)
    if len(phi_mem) == 0:
        phi_mem = top1_log_odds(cand_mem[:, -1])
    if len(phi_non) == 0:
        phi_non = top1_log_odds(cand_non[:, -1])
    if cfg.scenario == 2:
        return float(phi_mem.min()), float(phi_mem.mean())
    lo, hi = float(phi_mem.min()), float(phi_non.max())
    if hi <= lo:
        hi = lo + 1.0
    grid = np.linspace(lo, hi, cfg.grid_points + 1)
    all_mem, all_non = top1_log_odds(cand_mem), top1_log_odds(cand_non)
    best = (np.inf, (lo, hi))
    for i, a in enumerate(grid):
        for b in grid[i + 1:]:
            d = js_distance(_selected_phi(cand_mem, all_mem, (a, b)), _selected_phi(cand_non, all_non, (a, b)),
                            cfg.js_bins)
            best = min(best, (d, (float(a), float(b))), key=lambda t: t[0])
    return best[1]


@dataclass
class Diffence:
    """A classifier behind DIFFENCE. ``abar``: the diffusion schedule's cumulative alphas ``[T]``."""

    classifier: nn.Module
    unet: nn.Module
    abar: torch.Tensor
    config: DiffenceConfig
    interval: tuple[float, float] | None = None
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        fast_layout = self.device.type == "cuda"  # cuDNN's tensor-core convolutions want NHWC
        fmt = torch.channels_last if fast_layout else torch.contiguous_format
        self.classifier.to(self.device, memory_format=fmt).eval()
        self.unet.to(self.device, memory_format=fmt).eval()
        self.abar = self.abar.to(self.device, torch.float32)
        gpu = self.device.type == "cuda"
        self._chunk = self.config.chunk if self.config.chunk != "auto" else (4096 if gpu else 512)
        self._bf16 = self.config.precision == "bf16" or (self.config.precision == "auto" and gpu)
        self._unet_fn = torch.compile(self.unet) if self.config.compile is True or (
            self.config.compile == "auto" and gpu) else self.unet
        self._rng = np.random.default_rng(self.config.seed)
        self._gen = self.generator(self.config.seed)

    def generator(self, seed: int) -> torch.Generator:
        """A generator on this defense's device: noise is drawn where the UNet runs."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def _autocast(self):
        if self._bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` (fp32, on the device) of images ``[B, C, H, W]``, in chunks. Always in fp32, whatever
        ``precision`` says (it applies to the UNet only): the released vector is then exactly what the undefended
        classifier would say about the chosen image, and the selection sees the same logits it releases."""
        with torch.autocast(self.device.type, enabled=False):
            outs = [self.classifier(x[i:i + self._chunk].to(self.device)).float() for i in range(0, len(x), self._chunk)]
        return torch.cat(outs)

    @torch.no_grad()
    def regenerate(self, x01: torch.Tensor, gen: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """``[B, N, C, H, W]`` regenerations in [0, 1] (on the device) of ``x01 [B, C, H, W]``: all B·N through
        the UNet together, in chunks.

        ``gen``: one generator for the batch, or one per query (then each query's noise is independent of what
        else is in the batch).
        """
        b, n = len(x01), self.config.n
        rep = to_model_range(x01.to(self.device)).repeat_interleave(n, dim=0)  # [B*N, C, H, W]
        if isinstance(gen, list):
            noise = torch.cat([torch.randn((n, *x01.shape[1:]), generator=g, device=self.device) for g in gen])
        else:
            noise = torch.randn(rep.shape, generator=gen, device=self.device)
        out = []
        with self._autocast():
            for i in range(0, len(rep), self._chunk):
                x_t = noised(rep[i:i + self._chunk], self.config.t_prime, self.abar, noise[i:i + self._chunk],
                             self.config.noise_mode)
                out.append(to_data_range(ddim_denoise(self._unet_fn, x_t, self.config.t_prime, self.abar,
                                                      self.config.ddim_steps)).float())
        return torch.cat(out).view(b, n, *x01.shape[1:])

    def candidates(self, x01: torch.Tensor, gen: torch.Generator | list[torch.Generator] | None = None) -> np.ndarray:
        """Candidate logits ``[B, N+1, C]``: the N regenerations, then the original."""
        x01 = torch.as_tensor(x01, dtype=torch.float32).to(self.device)
        original = self._classify(x01)  # [B, C]
        if self.config.n == 0:
            return original[:, None].cpu().numpy()
        regen = self.regenerate(x01, gen or self._gen)
        logits = self._classify(regen.flatten(0, 1)).view(len(x01), self.config.n, -1)
        return torch.cat([logits, original[:, None]], dim=1).cpu().numpy()

    def calibrate(self, members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, float] | None:
        """Set the scenario's interval from the defender's known members / non-members (images in [0, 1])."""
        if self.config.scenario == 3 or self.config.n == 0:
            self.interval = None
            return None
        self.interval = search_interval(self.candidates(torch.from_numpy(members)),
                                        self.candidates(torch.from_numpy(nonmembers)), self.config)
        return self.interval

    def __call__(self, x01: np.ndarray | torch.Tensor, *, seed: int | None = None,
                 seeds: list[int] | None = None) -> np.ndarray:
        """Released logits ``[B, C]`` (softmax them for the released confidence vector). ``seed`` makes this
        call's noise independent of earlier calls; ``seeds`` (one per query) makes each query's output independent
        of its batch, as a server that batches requests needs."""
        if seeds is not None:
            if self.config.n == 0:
                return self.candidates(torch.as_tensor(x01, dtype=torch.float32))[:, 0]
            return self._released(x01, seeds)
        gen = self.generator(seed) if seed is not None else self._gen
        if self.config.n > 0 and self.config.scenario != 3 and self.interval is None:
            raise RuntimeError("scenarios 1 and 2 need calibrate() (or an interval) before use")
        cand = self.candidates(torch.as_tensor(x01, dtype=torch.float32), gen)
        if self.config.n == 0:
            return cand[:, 0]
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        idx = select(cand, None if self.config.scenario == 3 else self.interval, rng)
        return cand[np.arange(len(cand)), idx]

    def _released(self, x01: np.ndarray | torch.Tensor, seeds: list[int]) -> np.ndarray:
        if self.config.scenario != 3 and self.interval is None:
            raise RuntimeError("scenarios 1 and 2 need calibrate() (or an interval) before use")
        gens = [self.generator(s) for s in seeds]
        cand = self.candidates(torch.as_tensor(x01, dtype=torch.float32), gens)
        if self.config.scenario == 3:
            idx = np.concatenate([select(cand[i:i + 1], None, np.random.default_rng(s)) for i, s in enumerate(seeds)])
        else:
            idx = select(cand, self.interval)
        return cand[np.arange(len(cand)), idx]
