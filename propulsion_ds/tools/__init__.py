"""Offline tools around a trained adapter: merge, exports, the memory planner."""
