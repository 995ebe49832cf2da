"""Config of the model: the transformer backbone and its MoE layers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moetrain.config.mla import MLAConfig
from moetrain.config.rope import RopeScaling
from moetrain.config.routers import RouterConfig, TopKRouterConfig
from moetrain.config.schema import StrictModel

ExpertType = Literal["gelu", "swiglu", "stacked"]


# What each backbone defines unless the config overrides it.
ARCH_DEFAULTS: dict[str, dict[str, object]] = {
    "gpt2": {"ffn_type": "gelu", "norm": "layernorm", "bias": True},
    "llama": {"ffn_type": "swiglu", "norm": "rmsnorm", "bias": False},
}


class ModelConfig(StrictModel):
    arch: Literal["gpt2", "llama"] = Field(
        "gpt2",
        description="gpt2: learned positions, and by default LayerNorm, biases, GELU FFN; llama: rotary positions, "
        "optional grouped-query attention (n_kv_heads), and by default RMSNorm, no biases, SwiGLU FFN "
        "(norm, bias and ffn_type override the defaults; config.yaml holds the resolved values)",
    )
    vocab_size: int | None = Field(None, ge=2, description="default: the tokenizer's vocabulary")
    d_model: int = Field(128, ge=1)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(
        None, ge=1, description="llama: key/value heads (grouped-query attention); null = n_heads"
    )
    head_dim: int | None = Field(
        None,
        ge=1,
        description="dims of each attention head: queries, keys and values project to heads * head_dim, which "
        "need not be d_model (Qwen3-MoE); null = d_model / n_heads",
    )
    rope_theta: float = Field(10000.0, gt=0.0, description="llama: base of the rotary position frequencies")
    rope_scaling: RopeScaling | None = Field(
        None, description="llama: scaled rotary frequencies (linear, yarn, llama3; transformers' rope types)"
    )
    attention: Literal["mha", "mla"] = Field(
        "mha",
        description="mha: multi-head attention (grouped-query with n_kv_heads); mla: multi-head latent attention "
        "(DeepSeek-V2/V3; llama arch, no biases, dims in model.mla)",
    )
    mla: MLAConfig | None = Field(None, description="attention: mla -- its ranks and head dims")
    norm_eps: float = Field(1e-5, gt=0.0, description="epsilon of every LayerNorm (gpt2) or RMSNorm (llama)")
    d_ff: int = Field(512, ge=1)
    ffn_type: Literal["gelu", "swiglu"] | None = Field(None, description="null: gelu for gpt2, swiglu for llama")
    norm: Literal["layernorm", "rmsnorm"] | None = Field(
        None, description="every block's and the final norm; null: layernorm for gpt2, rmsnorm for llama"
    )
    bias: bool | None = Field(
        None, description="biases in the attention and dense FFN projections; null: true for gpt2, false for llama"
    )
    qkv_bias: bool | None = Field(
        None, description="biases of the query, key and value projections (Qwen2-MoE: true, bias false); null = bias"
    )
    attn_out_bias: bool | None = Field(None, description="bias of the attention output projection; null = bias")
    qk_norm: Literal["none", "head", "full"] = Field(
        "none",
        description="normalise queries and keys with model.norm (eps norm_eps) before rotary positions and the KV "
        "cache: head = over each head's head_dim dims, one weight shared by the heads (Qwen3-MoE); full = over the "
        "whole query projection (n_heads * head_dim) and key projection (kv heads * head_dim) (OLMoE)",
    )
    clip_qkv: float | None = Field(
        None,
        gt=0.0,
        description="clamp queries, keys and values to [-clip_qkv, clip_qkv] after qk_norm, before rotary positions "
        "(OLMoE's clip_qkv); null = no clamp",
    )
    max_seq_len: int = Field(256, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0.0)
    embed_scale: Literal["none", "sqrt_d"] = Field(
        "none",
        description="sqrt_d: token embeddings initialised N(0, d_model^-0.5) and multiplied by sqrt(d_model) in "
        "the forward (fairseq, the StableMoE code); none: N(0, init_std), unscaled",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        # Fill what the backbone defines (the resolved values are what config.yaml holds). Set through
        # __dict__: an assignment would re-run this validator.
        for name, value in ARCH_DEFAULTS[self.arch].items():
            if getattr(self, name) is None:
                self.__dict__[name] = value
        for name in ("qkv_bias", "attn_out_bias"):  # the attention's biases follow model.bias
            if getattr(self, name) is None:
                self.__dict__[name] = self.bias
        self._check_attention()
        if self.attention == "mha" and self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}), or set "
                "model.head_dim"
            )
        if self.arch == "gpt2" and self.n_kv_heads is not None:
            raise ValueError("model.n_kv_heads (grouped-query attention) needs model.arch: llama")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.arch == "llama" and self.attention == "mha" and self.resolved_head_dim % 2:
            which = "model.head_dim" if self.head_dim is not None else "the head dim d_model / n_heads"
            raise ValueError(f"model.arch llama: {which} ({self.resolved_head_dim}) must be even for rotary positions")
        return self

    def _check_attention(self) -> None:
        if self.rope_scaling is not None and self.arch != "llama":
            raise ValueError("model.rope_scaling scales rotary positions, which need model.arch: llama")
        if (self.attention == "mla") != (self.mla is not None):
            raise ValueError(
                f"model.attention is {self.attention} but model.mla is {'set' if self.mla else 'null'}; "
                "set both (attention: mla with its model.mla section) or neither"
            )
        if self.attention != "mla":
            return
        if self.arch != "llama" or self.bias:
            raise ValueError(
                f"model.attention mla needs model.arch: llama (rotary positions) and model.bias: false (got arch "
                f"{self.arch}, bias {self.bias}); set them"
            )
        if self.n_kv_heads is not None and self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"model.n_kv_heads ({self.n_kv_heads}) does not apply to model.attention mla (every head has its "
                "own keys and values from the shared latent); remove it"
            )
        mha_only = {
            "head_dim": self.head_dim is not None,
            "qk_norm": self.qk_norm != "none",
            "clip_qkv": self.clip_qkv is not None,
            "qkv_bias": self.qkv_bias,
            "attn_out_bias": self.attn_out_bias,
        }
        for name, set_ in mha_only.items():
            if set_:
                raise ValueError(
                    f"model.{name} ({getattr(self, name)}) is an option of model.attention mha; model.attention mla "
                    "takes its dims from model.mla and has no biases, norms or clamp of its own; remove it"
                )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        """``head_dim``, or d_model / n_heads when it is null (kept null in config.yaml, so an override of
        d_model or n_heads moves it)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """The dims each rotary rotation covers: the head dim, or MLA's rotary part of it."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.resolved_head_dim


class FluctuationConfig(StrictModel):
    interval: int = Field(0, ge=0, description="optimizer steps between routing probes (0: off; the paper: 500)")
    blocks: int = Field(16, ge=1, description="validation blocks (data.seq_len tokens each) in the probe set")


class MoEConfig(StrictModel):
    placement: Literal["replace_ffn", "insert"] = Field(
        "replace_ffn",
        description="replace_ffn: the FFN of every `every`-th block is an MoE layer; "
        "insert: an extra MoE layer after each block in `insert_after` (the StableMoE paper)",
    )
    every: int = Field(1, ge=1, description="replace_ffn: MoE in blocks every, 2*every, ... (1-based)")
    layers: list[int] | None = Field(
        None,
        description="replace_ffn: the 0-based blocks whose FFN is an MoE layer, the others dense (model.d_ff); "
        "overrides `every` (e.g. DeepSeek-V3's dense first blocks, Qwen2-MoE's mlp_only_layers)",
    )
    insert_after: list[int] | None = Field(None, description="insert: 0-based block indices; default the middle block")
    num_experts: int = Field(8, ge=1)
    expert_type: ExpertType = Field(
        "gelu", description="unset in a job config: the model's ffn_type (gelu for gpt2, swiglu for llama)"
    )
    expert_hidden: int | None = Field(None, ge=1, description="expert FFN width; default model.d_ff")
    sublayers: int = Field(3, ge=1, description="stacked experts: residual FFN sublayers per expert")
    shared_experts: int = Field(
        0, ge=0, description="DeepSeekMoE: always-on experts beside the routed ones (gelu / swiglu); 0 = none"
    )
    num_experts_per_layer: list[int] | None = Field(
        None,
        description="PR-MoE's pyramid: the number of experts of each MoE layer, in order (replaces "
        "moe.num_experts there; e.g. [8, 16] for more experts in the later layer); topk / expert_choice routers",
    )
    residual: bool = Field(
        False,
        description="Residual MoE (DeepSpeed-MoE): a dense FFN of the expert type and width beside the routed "
        "experts, output = c0 * moe + c1 * ffn with [c0, c1] = softmax(x W_c), W_c learned per layer",
    )
    null_experts: int = Field(
        0,
        ge=0,
        description="AdaMoE: zero-compute experts the top-k router may choose besides the real ones (a token's "
        "slots routed to them cost nothing; logged as active_experts); topk router only",
    )
    shared_expert_hidden: int | None = Field(
        None, ge=1, description="width of each shared expert; default moe.expert_hidden (docs/routers.md)"
    )
    shared_expert_gate: bool = Field(
        False,
        description="scale the shared experts' output by sigmoid(x w_gate), w_gate a learned [d_model, 1] per layer "
        "(Qwen2-MoE's shared_expert_gate); needs moe.shared_experts >= 1",
    )
    expert_init: Literal["default", "fairseq"] = Field(
        "default",
        description="stacked experts: default = W1 N(0, 1/d), biases 0, W2 0 (each expert the identity); fairseq "
        "= the StableMoE code (torch Linear init: W1, b1 U(+-1/sqrt(d)), b2 U(+-1/sqrt(d_ff)); only W2 zeroed)",
    )
    capacity_factor: float | None = Field(
        None, gt=0, description="null = dropless; else slots per expert = ceil(cf*T*K/E)"
    )
    expert_parallel_size: int = Field(1, ge=1, description="ranks the experts are sharded over")
    ep_overlap: bool = Field(
        False,
        description="under expert parallelism, compute each rank's own rows (which never travel) while the token "
        "all-to-alls run, in forward and backward (moetrain/parallel/overlap.py); off under activation "
        "checkpointing. Measured slower on 2 CPU cores with gloo (docs/benchmarks.md); not measured on GPUs",
    )
    dispatch: Literal["flat", "hierarchical"] = Field(
        "flat",
        description="the EP token exchange: flat (one all-to-all over the EP group) or hierarchical (gather within "
        "each node, then exchange across nodes; only where EP groups span nodes: docs/parallelism.md)",
    )
    kernels: Literal["auto", "triton", "torch"] = "auto"
    router: RouterConfig = TopKRouterConfig()
    fluctuation: FluctuationConfig = Field(
        FluctuationConfig(), description="routing-fluctuation probe (moetrain/moe/fluctuation.py)"
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        ep = self.expert_parallel_size
        if self.num_experts % ep:
            raise ValueError(
                f"moe.num_experts ({self.num_experts}) must be divisible by moe.expert_parallel_size ({ep})"
            )
        for n in self.num_experts_per_layer or []:
            if n < 1 or n % ep:
                raise ValueError(
                    f"moe.num_experts_per_layer ({self.num_experts_per_layer}) holds {n}; each must be a positive "
                    f"multiple of moe.expert_parallel_size ({ep})"
                )
        if self.num_experts_per_layer is not None and self.router.kind not in ("topk", "expert_choice"):
            raise ValueError(
                f"moe.num_experts_per_layer needs moe.router.kind topk or expert_choice (got {self.router.kind}, "
                "whose routing tables are built for one number of experts); remove it or change the router"
            )
        if self.expert_init == "fairseq" and self.expert_type != "stacked":
            raise ValueError(
                f"moe.expert_init fairseq is the StableMoE code's init of stacked experts, but moe.expert_type is "
                f"{self.expert_type}; set moe.expert_type: stacked or moe.expert_init: default"
            )
        if self.residual and self.expert_type == "stacked":
            raise ValueError(
                "moe.residual's dense branch is a gelu or swiglu FFN, but moe.expert_type is stacked; set "
                "moe.expert_type: gelu or swiglu, or moe.residual: false"
            )
        if self.shared_experts and self.expert_type == "stacked":
            raise ValueError(
                f"moe.shared_experts ({self.shared_experts}) are gelu or swiglu FFNs, but moe.expert_type is "
                "stacked; set moe.expert_type: gelu or swiglu, or moe.shared_experts: 0"
            )
        if self.shared_expert_gate and not self.shared_experts:
            raise ValueError(
                "moe.shared_expert_gate scales the shared experts' output, but moe.shared_experts is 0; set "
                "moe.shared_experts: 1 (or more) or moe.shared_expert_gate: false"
            )
        if self.router.kind == "expert_choice" and self.capacity_factor is not None:
            raise ValueError(
                f"moe.capacity_factor ({self.capacity_factor}) does not apply to expert-choice routing: each expert "
                "takes exactly its capacity of tokens; set moe.capacity_factor: null and use "
                "moe.router.capacity_factor"
            )
        if self.dispatch == "hierarchical" and self.ep_overlap:
            raise ValueError(
                "moe.dispatch hierarchical does not overlap its exchanges with the experts; set moe.ep_overlap: false "
                "or moe.dispatch: flat"
            )
        if self.null_experts and self.router.kind != "topk":
            raise ValueError(
                f"moe.null_experts ({self.null_experts}) needs moe.router.kind: topk (got {self.router.kind}: it "
                "sends every token to exactly one real expert); set moe.null_experts: 0"
            )
        if isinstance(self.router, TopKRouterConfig) and self.router.num_groups > 1:
            if self.null_experts:
                raise ValueError(
                    f"moe.router.num_groups ({self.router.num_groups}) groups the real experts; it does not combine "
                    f"with moe.null_experts ({self.null_experts}); set one of them back (1 / 0)"
                )
            for n in sorted({self.num_experts, *(self.num_experts_per_layer or [])}):
                self.router.check_groups(n)
        top_k = getattr(self.router, "top_k", 1)
        fewest = min([self.num_experts, *(self.num_experts_per_layer or [])])
        if self.num_experts_per_layer is not None and top_k > fewest + self.null_experts:
            raise ValueError(f"moe.router.top_k ({top_k}) must be <= the fewest experts of a layer ({fewest})")
        if top_k > self.num_experts + self.null_experts:
            raise ValueError(
                f"moe.router.top_k ({top_k}) must be <= moe.num_experts ({self.num_experts})"
                + (f" + moe.null_experts ({self.null_experts})" if self.null_experts else "")
            )
        return self

    def check_against_model(self, n_layers: int) -> None:
        for i in self.insert_after or []:
            if not 0 <= i < n_layers:
                raise ValueError(
                    f"moe.insert_after ({self.insert_after}) holds {i}, outside the blocks 0..{n_layers - 1}"
                )
        if self.layers is not None and self.placement != "replace_ffn":
            raise ValueError(
                f"moe.layers ({self.layers}) chooses the blocks of replace_ffn, but moe.placement is {self.placement}; "
                "use moe.insert_after for inserted MoE layers"
            )
        for i in self.layers or []:
            if not 0 <= i < n_layers:
                raise ValueError(f"moe.layers ({self.layers}) holds {i}, outside the blocks 0..{n_layers - 1}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError(f"moe.layers ({self.layers}) must name at least one block, each once")
        if self.placement == "replace_ffn" and self.layers is None and self.every > n_layers:
            raise ValueError(f"moe.every ({self.every}) must be <= model.n_layers ({n_layers})")
        per_layer = self.num_experts_per_layer
        if per_layer is not None and len(per_layer) != len(self.moe_blocks(n_layers)):
            raise ValueError(
                f"moe.num_experts_per_layer has {len(per_layer)} entries but the model has "
                f"{len(self.moe_blocks(n_layers))} MoE layers (blocks {self.moe_blocks(n_layers)}); give one per layer"
            )

    def experts_of_layer(self, j: int) -> int:
        """Experts of the j-th MoE layer (0-based, in block order)."""
        return self.num_experts_per_layer[j] if self.num_experts_per_layer is not None else self.num_experts

    def moe_blocks(self, n_layers: int) -> list[int]:
        """0-based block indices that hold (replace_ffn) or are followed by (insert) an MoE layer."""
        if self.placement == "replace_ffn":
            if self.layers is not None:
                return sorted(self.layers)
            return [i for i in range(n_layers) if (i + 1) % self.every == 0]
        return sorted(self.insert_after) if self.insert_after is not None else [n_layers // 2 - 1]
