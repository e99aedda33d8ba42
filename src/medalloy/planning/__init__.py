"""nnU-Net-like planning: fingerprint a dataset, then choose dimension, spacing, patch, normalisation and network."""

from medalloy.planning.plan import NetworkPlan, Plan, load_plan, save_plan

__all__ = ["NetworkPlan", "Plan", "load_plan", "save_plan"]
