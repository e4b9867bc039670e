"""The app's pages, each run by Streamlit as a script."""
