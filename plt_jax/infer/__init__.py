"""Inference: cached decoding, generation and loading a model for it.

  decode.py   KV caches and the PLT / vanilla decode steps (`Decoder`), checked against the model
  generate.py sampling and streaming generation on top of the decoder (`Generator`)
  loading.py  one loader for a training work dir or a Hugging Face directory
"""
