"""vlpgraph's analysis app (Streamlit): the repository's app/ folder, installed as ``vlpgraph.app``."""
