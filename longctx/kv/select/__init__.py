"""The select axis: which of the kept tokens each decode step reads (``base`` explains the contract)."""
