"""aad for LlamaIndex: capture (AADEventHandler) and routing (RoutedLLM)."""
