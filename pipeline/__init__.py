"""The `pipeline` command: a thin click skin over train/, quantize/ and serve/."""
