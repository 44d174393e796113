"""aad for LangChain: capture (AADCallbackHandler) and routing (RoutedChatModel)."""
