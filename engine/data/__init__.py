"""Data and the embedded model: chat datasets and their validation (`chat_data`), the harmony format, the demo
tasks and the embedded tiny gpt-oss with its tokenizer (`embedded_model`).

May import: `engine.recipe`.
"""
