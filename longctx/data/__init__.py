"""Text shipped with the package (built-in haystack for demos and tasks)."""
