"""Efficiency options: AdaLoRA's budget schedule (adalora) and, later, GEAR KV-cache compression."""
