"""Text models the transformer benchmark builds in torch: a BERT sentence encoder that loads real pretrained
weights from a safetensors file, and a small pre-LN decoder it trains itself.

- `read_safetensors`: the safetensors layout (an 8-byte little-endian header length, a JSON header naming
  each tensor's dtype, shape and byte range, then the raw little-endian bytes) read with numpy; offsets and
  sizes are checked against the file before anything is read.
- `SentenceEncoder`: Hugging Face's BertModel computed exactly (word + absolute position + token-type-0
  embeddings, LayerNorm with the config's eps, post-LN blocks, exact-erf GELU, the additive padding mask
  (1 - mask) * finfo.min on the attention scores), then mean pooling over the attention mask and L2
  normalisation, which is what sentence-transformers' all-MiniLM-L6-v2 (Transformer, Pooling(mean),
  Normalize) computes. Module attribute names follow BertModel's state-dict keys, so the checkpoint loads
  by name with every key accounted for.
- `Decoder`: a pre-LN causal language model in the Llama layout: RMSNorm, rotary position embeddings on
  q and k (the rotate-half convention: dimension i pairs with i + head_dim/2), grouped-query attention (each
  K/V head serves a contiguous group of query heads) and a SwiGLU MLP; the causal mask and the rotary
  angles are computed inside the forward from the sequence length, so exported graphs keep batch and
  sequence dynamic.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


# ------------------------------------------------------------------------------------------- safetensors
def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a numpy array (BF16 widened to float32)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise ValueError(f"{path}: header length {header_length} runs past the end of the file ({size} bytes)")
        header = json.loads(handle.read(header_length))
        start = 8 + header_length
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            first, last = entry["data_offsets"]
            if not 0 <= first <= last <= size - start:
                raise ValueError(f"{path}: tensor {name!r} has byte range {first}-{last} outside the data")
            handle.seek(start + first)
            tensors[name] = _decode(handle.read(last - first), entry["dtype"], entry["shape"], name)
    return tensors


def _decode(raw: bytes, dtype: str, shape: list[int], name: str) -> np.ndarray:
    if dtype == "BF16":  # the upper half of a float32
        halves = np.frombuffer(raw, dtype="<u2")
        values = (halves.astype(np.uint32) << 16).view(np.float32)
    elif dtype in _SAFETENSORS_DTYPES:
        values = np.frombuffer(raw, dtype=np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<"))
    else:
        raise ValueError(f"tensor {name!r}: safetensors dtype {dtype} is not supported")
    if values.size != math.prod(shape):
        raise ValueError(f"tensor {name!r}: {values.size} values for shape {shape}")
    return values.reshape(shape).astype(values.dtype.newbyteorder("="))


# ----------------------------------------------------------------------------------------- BERT encoder
@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        config = json.loads(Path(path).read_text())
        if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type",
                                                                     "absolute") != "absolute":
            raise ValueError(f"{path}: only exact GELU and absolute positions are implemented")
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


class _Embeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # the checkpoint's key

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        sequence = input_ids.shape[1]
        positions = self.position_embeddings.weight[:sequence]
        segment = self.token_type_embeddings.weight[0]  # every token in segment 0: one sentence per input
        return self.LayerNorm(self.word_embeddings(input_ids) + positions + segment)


class _SelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.query, self.key, self.value = (nn.Linear(config.hidden_size, config.hidden_size) for _ in range(3))

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden.shape
        query, key, value = (projection(hidden).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
                             for projection in (self.query, self.key, self.value))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        context = torch.matmul(scores.softmax(dim=-1), value)
        return context.transpose(1, 2).reshape(batch, tokens, width)


class _Output(nn.Module):
    """A dense layer, then LayerNorm of the residual sum: BertSelfOutput and BertOutput."""

    def __init__(self, inputs: int, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class _Attention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _Output(config.hidden_size, config)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, bias), hidden)


class _Intermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(hidden))  # exact erf form, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config.intermediate_size, config)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, bias)
        return self.output(self.intermediate(attended), attended)


class _Encoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))


class SentenceEncoder(nn.Module):
    """BERT, then the attention-mask mean of the last hidden states, L2-normalised: (input_ids,
    attention_mask) int64 [batch, sequence] -> [batch, hidden]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        mask = attention_mask.to(hidden.dtype)
        bias = (1.0 - mask[:, None, None, :]) * torch.finfo(hidden.dtype).min
        for layer in self.encoder.layer:
            hidden = layer(hidden, bias)
        weights = mask[:, :, None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def load_sentence_encoder(model_dir: str | Path) -> SentenceEncoder:
    """The encoder of a sentence-transformers BERT folder (config.json, model.safetensors) in eval mode.
    Checkpoint keys may carry a `bert.` prefix; the pooler and position_ids buffers are not used."""
    model_dir = Path(model_dir)
    encoder = SentenceEncoder(BertConfig.from_json(model_dir / "config.json"))
    state = {name.removeprefix("bert."): torch.from_numpy(array)
             for name, array in read_safetensors(model_dir / "model.safetensors").items()}
    state = {name: value for name, value in state.items()
             if not name.startswith("pooler.") and name != "embeddings.position_ids"}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not match BertModel: missing {missing}, "
                         f"unexpected {unexpected}")
    return encoder.eval()


# -------------------------------------------------------------------------------------------- decoder
@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    layers: int = 4
    dim: int = 192
    heads: int = 6
    kv_heads: int = 2
    ffn: int = 512
    rope_base: float = 10000.0
    eps: float = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class _CausalAttention(nn.Module):
    """Grouped-query attention with rotary q/k; `heads // kv_heads` query heads share each K/V head."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.heads, config.kv_heads
        self.head_dim = config.dim // config.heads
        self.q_proj = nn.Linear(config.dim, config.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        query = self.q_proj(x).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        query, key = query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin
        group = self.heads // self.kv_heads
        key, value = (t[:, :, None].expand(batch, self.kv_heads, group, tokens, self.head_dim)
                      .reshape(batch, self.heads, tokens, self.head_dim) for t in (key, value))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        context = torch.matmul(scores.softmax(dim=-1), value).transpose(1, 2).reshape(batch, tokens, -1)
        return self.o_proj(context)


class _SwiGLU(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn, bias=False)
        self.down_proj = nn.Linear(config.ffn, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderBlock(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_norm, self.post_attention_norm = RMSNorm(config.dim, config.eps), RMSNorm(config.dim, config.eps)
        self.attention, self.mlp = _CausalAttention(config), _SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_norm(x))


class Decoder(nn.Module):
    """input_ids int64 [batch, sequence] -> next-token logits [batch, sequence, vocab]."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.dim % config.heads or config.heads % config.kv_heads or (config.dim // config.heads) % 2:
            raise ValueError(f"{config}: heads must divide dim (even head_dim) and kv_heads divide heads")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(_DecoderBlock(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim, config.eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        head_dim = config.dim // config.heads
        inverse = 1.0 / config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inverse_frequency", inverse, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        angles = positions[:, None].to(torch.float32) * self.inverse_frequency[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # [sequence, head_dim], broadcast over batch and heads
        cos, sin = angles.cos(), angles.sin()
        future = positions[None, :] > positions[:, None]
        bias = torch.where(future, torch.finfo(x.dtype).min, 0.0).to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, bias)
        return self.head(self.norm(x))
