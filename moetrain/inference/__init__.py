"""Use a trained model: load any checkpoint on one process, evaluate it, sample from it.

- :mod:`.loading`: a checkpoint folder or run directory -> the model (every global expert, whatever
  expert-parallel layout saved it), its job config and its tokenizer; nothing executes code;
- :mod:`.text`: the run's tokenizer for encoding, streaming decoding, and bytes per token (bits per byte);
- :mod:`.evaluate`: loss, perplexity and bits per byte on the validation split or on given files;
- :mod:`.generate`: autoregressive sampling with a KV cache (``moetrain/backbone/kv_cache.py``).

Routing is the training evaluation's: the model is in eval mode, so StableMoE routes with the frozen
distilled router (``moe.router.eval_routing``), BASE greedily, top-k and Hash as in training.
"""
