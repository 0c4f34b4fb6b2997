"""Ray pipeline stages of K-MIM (`kmim pipeline extract|cluster|tokenize`), installed as `kmim.pipeline`."""
