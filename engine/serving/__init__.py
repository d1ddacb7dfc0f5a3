"""Serving: server backends and what each checkpoint format needs (`backends`, `formats`), servers as tracked
detached processes (`server_process`), harmony channels through transformers serve (`harmony_view`), and the chat
client (`chat`).

May import: `engine.data` (harmony), `engine.fp4` (the dequantized copy of an NVFP4 export that transformers serve
loads), `engine.runtime` (workspace, telemetry), `storage`.
"""
