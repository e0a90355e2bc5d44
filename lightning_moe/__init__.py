"""lightning-moe: sparse mixture-of-experts methods for multimodal LLMs on PyTorch Lightning."""
