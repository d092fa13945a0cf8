"""Integrations of dmattn_cupy with model libraries.

``dmattn_cupy.integrations.transformers``: an attention function for Hugging Face transformers'
``AttentionInterface`` (``register()`` adds it under the name "dmattn_cupy"). Nothing here is
imported until used, so transformers stays optional.
"""
