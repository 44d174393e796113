"""The lazy model toolkit plugins may use: students and their cache, the chat format, teacher
signals, embeddings, the serving runtime and the answer bank. Nothing here imports torch at
module import; each function loads what it needs when called."""
