"""The projection of a low-rank teacher cache (``cache.mode: lowrank``, read by
:class:`~lmdistill.teachers.cache.lowrank.LowRankTeacherCache`): the teacher's final hidden state on its top
principal directions, in int8.

A causal LM's logits are a linear function of its final hidden state h (``logits = W h + b``), and those
states occupy a low-dimensional subspace: on the KJV demo teacher (H = 256), 128 principal directions
hold 99.94% of their variance. Storing, per token, the coordinates of h on the top-k directions (PCA over
a sample of the teacher's own states, each coordinate divided by its standard deviation) as int8 with one
per-token scale costs k + 2 bytes, whatever the vocabulary, and gives back *dense* teacher logits
``W (mean + B diag(sigma) z) + b`` (one matrix product, the size of a student's output layer with hidden
size k): every objective works with it, not only those linear in the teacher's probabilities, and the
chunked loss path takes it as ``(z, W B diag(sigma), W mean + b)`` like a live teacher's hidden states.

The price is a bias (the discarded directions and the rounding), which is measured when the cache is
built: the mean and 99th percentile of ``KL(p_teacher || p_cache)`` per token on held-out blocks, recorded
in the manifest (``projection.fidelity``) and logged. Principal component analysis: Pearson, "On lines and
planes of closest fit to systems of points in space" (1901); the int8 per-token absmax scaling is the
usual symmetric quantisation (e.g. Dettmers et al., "LLM.int8()", arXiv:2208.07339).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmdistill.errors import ConfigError

log = logging.getLogger(__name__)

PROJECTION_NAME = "projection.safetensors"
FIT_TOKENS = 32768  # hidden states sampled for the principal directions (half for the fit, half held out)
CODE_MAX = 127  # symmetric int8 codes in [-127, 127]


@dataclass(frozen=True)
class LowRankProjection:
    """Principal directions of a teacher's final hidden states and its output layer projected onto them.

    Attributes: ``mean [H]``, ``basis [H, k]`` (orthonormal columns, largest variance first), ``sigma [k]``
    (standard deviation of each coordinate), ``weight [V, k] = W basis diag(sigma)``, ``bias [V] = W mean + b``
    (float32; W, b the teacher's output layer over the real vocabulary).
    """

    mean: Tensor
    basis: Tensor
    sigma: Tensor
    weight: Tensor
    bias: Tensor

    @property
    def k(self) -> int:
        return self.basis.shape[1]

    def encode(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``hidden [..., H]`` -> (int8 codes ``[..., k]`` as int64, per-token scale ``[...]`` float32)."""
        z = ((hidden.double() - self.mean.double()) @ self.basis.double()) / self.sigma.double()
        scale = z.abs().amax(-1) / CODE_MAX
        codes = torch.where(scale.unsqueeze(-1) > 0, z / scale.clamp_min(1e-300).unsqueeze(-1), 0.0)
        return codes.round().clamp_(-CODE_MAX, CODE_MAX).long(), scale.float()

    def coordinates(self, codes: Tensor, scale: Tensor) -> Tensor:
        """Dequantised coordinates ``z [..., k]`` float32 (the "hidden state" the projected weight expects)."""
        return codes.float() * scale.float().unsqueeze(-1)

    def logits(self, codes: Tensor, scale: Tensor) -> Tensor:
        """Teacher logits ``[..., V]`` float32 rebuilt from stored codes."""
        z = self.coordinates(codes, scale)
        return torch.nn.functional.linear(z, self.weight, self.bias)

    def to_bytes(self, metadata: dict[str, Any]) -> bytes:
        """The safetensors bytes of this projection (``metadata`` goes into the header as JSON)."""
        from safetensors.torch import save

        tensors = {name: getattr(self, name).contiguous() for name in ("mean", "basis", "sigma", "weight", "bias")}
        # one header key: safetensors writes its metadata map in no fixed order, which would vary the file's bytes
        return save(tensors, metadata={"lmdistill": json.dumps(metadata, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "LowRankProjection":
        """A projection from its safetensors bytes (no pickle)."""
        from safetensors.torch import load

        tensors = load(data)
        return cls(**{name: tensors[name] for name in ("mean", "basis", "sigma", "weight", "bias")})


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively, i.e. faster than float32: a CUDA GPU with bf16
    support, or an x86 CPU with AVX512-BF16 or AMX instructions (elsewhere oneDNN emulates bf16 products, or
    the platform is not checked here: float32 is the safe answer)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # torch's private CPU feature queries; treat their absence as "no"
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def projection_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a saved projection (fidelity, fit blocks, ...), from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("lmdistill", "{}"))


def output_layer(model: torch.nn.Module, vocab_size: int) -> tuple[Tensor, Tensor | None]:
    """The teacher's output weight ``[V, H]`` and bias over the real vocabulary."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight[:vocab_size].detach(), None if bias is None else bias[:vocab_size].detach()


@torch.no_grad()
def final_hidden(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """The final hidden states ``[B, L, H]`` the output layer reads (after the last norm)."""
    return model.base_model(input_ids=input_ids).last_hidden_state


@torch.no_grad()
def check_linear_head(model: torch.nn.Module, input_ids: Tensor, vocab_size: int) -> None:
    """Refuse teachers whose logits are not ``W h + b`` of the final hidden state (e.g. soft-capped logits):
    a low-rank cache would store the wrong thing."""
    logits = model(input_ids=input_ids).logits[..., :vocab_size].float()
    weight, bias = output_layer(model, vocab_size)
    rebuilt = torch.nn.functional.linear(final_hidden(model, input_ids).float(), weight.float(),
                                         None if bias is None else bias.float())
    error = float((logits - rebuilt).abs().max())
    if error > 1e-3 * (1.0 + float(logits.abs().max())):
        raise ConfigError(
            f"cache.mode lowrank needs logits that are a linear function of the teacher's final hidden state; this "
            f"teacher's differ from output_layer(last_hidden_state) by up to {error:.3g}. Use cache.mode: hybrid or topk"
        )


def fit_projection(hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> LowRankProjection:
    """Principal directions of ``hidden [N, H]`` (float64 covariance, eigen-decomposition) and the projected
    output layer."""
    x = hidden.reshape(-1, hidden.shape[-1]).double()
    if k > x.shape[1]:
        raise ConfigError(f"cache k (principal components) must be at most the teacher's hidden size {x.shape[1]}, got {k}")
    mean = x.mean(0)
    centred = x - mean
    covariance = centred.T @ centred / max(1, x.shape[0] - 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    order = torch.argsort(values, descending=True)[:k]
    basis = vectors[:, order]
    # a direction with no variance in the sample keeps unit scale (its coordinates are then ~0 anyway)
    sigma = values[order].clamp_min(0.0).sqrt()
    sigma = torch.where(sigma > 1e-12 * max(1.0, float(sigma.max())), sigma, torch.ones_like(sigma))
    w = weight.double()
    projected = (w @ basis) * sigma
    offset = w @ mean + (0.0 if bias is None else bias.double())
    return LowRankProjection(mean.float(), basis.float(), sigma.float(), projected.float(), offset.float())


def fidelity(projection: LowRankProjection, hidden: Tensor, weight: Tensor, bias: Tensor | None,
             temperature: float, scale_dtype: torch.dtype) -> dict[str, float]:
    """KL(p_teacher || p_cache) per token at ``temperature`` (nats; mean and 99th percentile) and top-1 agreement
    on ``hidden [N, H]``, with the scale rounded to its storage dtype as a reader will see it."""
    x = hidden.reshape(-1, hidden.shape[-1])
    kls, agree = [], []
    for start in range(0, x.shape[0], 1024):
        rows = x[start : start + 1024]
        exact = torch.nn.functional.linear(rows.double(), weight.double(), None if bias is None else bias.double())
        codes, scale = projection.encode(rows)
        rebuilt = projection.logits(codes, scale.to(scale_dtype)).double()
        p_log = torch.log_softmax(exact / temperature, -1)
        q_log = torch.log_softmax(rebuilt / temperature, -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
        agree.append(exact.argmax(-1) == rebuilt.argmax(-1))
    kl = torch.cat(kls)
    return {
        "kl_mean_nats": float(kl.mean()),
        "kl_p99_nats": float(torch.quantile(kl.float(), 0.99)),
        "top1_agreement": float(torch.cat(agree).double().mean()),
        "tokens": int(kl.numel()),
    }


def fit_blocks(n_blocks: int, block_size: int) -> tuple[list[int], list[int]]:
    """Evenly spaced blocks for the fit and, interleaved with them, held-out blocks for the fidelity check
    (about :data:`FIT_TOKENS` tokens in all; with a single block it serves both)."""
    wanted = max(2, math.ceil(FIT_TOKENS / block_size))
    chosen = sorted(set(np.linspace(0, n_blocks - 1, num=min(wanted, n_blocks)).round().astype(int).tolist()))
    if len(chosen) == 1:
        return chosen, chosen
    return chosen[0::2], chosen[1::2]


def build_projection(model: torch.nn.Module, ids: Any, n_blocks: int, block_size: int, k: int, vocab_size: int,
                     temperature: float, scale_dtype: torch.dtype, batch_size: int,
                     device: torch.device) -> tuple[LowRankProjection, dict[str, Any]]:
    """Fit the projection on the teacher's own hidden states over sampled blocks of ``ids`` and measure it on
    held-out blocks. Returns the projection and its metadata (fidelity, blocks used)."""
    fit, held_out = fit_blocks(n_blocks, block_size)

    def states(blocks: list[int]) -> Tensor:
        out = []
        for start in range(0, len(blocks), batch_size):
            window = np.stack([np.asarray(ids[b * block_size : (b + 1) * block_size], dtype=np.int64)
                               for b in blocks[start : start + batch_size]])
            out.append(final_hidden(model, torch.from_numpy(window).to(device)).float().cpu())
        return torch.cat(out).reshape(-1, out[0].shape[-1])

    first = torch.from_numpy(np.asarray(ids[fit[0] * block_size : (fit[0] + 1) * block_size], dtype=np.int64))
    check_linear_head(model, first.unsqueeze(0).to(device), vocab_size)
    weight, bias = output_layer(model, vocab_size)
    weight, bias = weight.float().cpu(), None if bias is None else bias.float().cpu()
    projection = fit_projection(states(fit), weight, bias, k)
    quality = fidelity(projection, states(held_out), weight, bias, temperature, scale_dtype)
    hidden_size = weight.shape[1]
    log.info(
        "low-rank teacher cache: %d of %d directions; held-out KL(teacher || cache) %.2e nats/token (p99 %.2e), "
        "top-1 agreement %.4f", k, hidden_size, quality["kl_mean_nats"], quality["kl_p99_nats"], quality["top1_agreement"],
    )
    if quality["kl_mean_nats"] > 0.01:
        log.warning("low-rank teacher cache: held-out KL %.3g nats/token is large; raise cache.k (at most %d) or use "
                    "cache.mode: hybrid", quality["kl_mean_nats"], hidden_size)
    metadata = {"fidelity": quality, "fit_blocks": len(fit), "held_out_blocks": len(held_out),
                "hidden_size": hidden_size, "temperature": temperature}
    return projection, metadata
