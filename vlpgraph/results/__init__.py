"""Reading results back from the store: ``analysis`` (the app's queries, aggregated in DuckDB),
``report`` (`vlpgraph report`'s tables), ``plots`` (the app's plotly figures)."""
