"""Efficiency options: AdaLoRA's budget schedule (adalora) and GEAR / KIVI KV-cache compression (gear)."""
