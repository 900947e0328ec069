"""Values as stored: serde (serialiser), keys, crypto (AEAD, MACs), codec (policy), rekey."""
