"""Gradient codecs. See ``compressors.base`` for the interface and
``compressors.registry.create_codec`` to build one from a spec string."""
