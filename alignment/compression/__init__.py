"""Efficiency options: GEAR / KIVI KV-cache compression for rollouts (gear)."""
