"""JD Cloud API access: request signing (signer), HTTP client and listing."""
