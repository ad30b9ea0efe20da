"""Using a trained model: `ftlab chat` (a REPL on the training template), `ftlab serve` (an OpenAI-compatible
server with continuous batching) and `ftlab export` (merged weights, GGUF, model card, Hub)."""
