"""Backbone pieces shared by both architectures (``model.arch``), built for one process.

- :mod:`.norm`: LayerNorm (gpt2) or RMSNorm (llama), chosen once by :func:`make_norm`;
- :mod:`.attention`: causal self-attention with fused QKV, optional rotary positions, grouped-query
  attention, query/key norms and a q/k/v clamp, and an optional KV cache;
- :mod:`.kv_cache`: the cache that ``moetrain generate`` carries from one new token to the next;
- :mod:`.rope`: rotary frequencies, plain or scaled (``model.rope_scaling``: linear, yarn, llama3);
- :mod:`.mla`: multi-head latent attention (``model.attention: mla``, DeepSeek-V2/V3).

The llama variant follows Hugging Face's ``LlamaForCausalLM`` / ``MixtralForCausalLM`` math exactly
(RMSNorm in fp32, the ``rotate_half`` rotary convention, key/value head ``i // (H / Hkv)`` for query
head ``i``), so ``moetrain export`` writes its weights without any re-ordering.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``; here also H query heads, G key/value heads
(H / G queries share one), A head dim, P positions held in the cache, X a projection's width
(H * A or G * A).
"""
