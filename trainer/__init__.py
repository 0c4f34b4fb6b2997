"""The DDP masked-image-modeling trainer (`kmim train`), installed as `kmim.trainer`."""
