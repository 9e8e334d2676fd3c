"""Explanations: LRP relevance maps (captum), atlas region ranking and statistics."""
