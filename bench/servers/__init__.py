"""Peer servers for the serving benchmark, each written the way that framework's docs suggest.

All load the same Macula checkpoint with ``models.load_checkpoint`` (safetensors, no pickle), preprocess with
the checkpoint's own ``Preprocessing.eval_transform()`` and answer ``{"top_k": [{"index", "label", "score"}]}``.
"""
