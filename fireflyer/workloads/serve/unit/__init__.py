"""A unit of several ranks: data-parallel attention, expert-parallel MoE, one HTTP front."""
