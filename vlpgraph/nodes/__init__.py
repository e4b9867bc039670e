"""Built-in node kinds, one module per kind, grouped by role. Importing a module registers its kind."""
