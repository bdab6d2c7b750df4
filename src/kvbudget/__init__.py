"""kvbudget."""
