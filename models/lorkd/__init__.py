"""LoRKD decomposition toolkit."""
