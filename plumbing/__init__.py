"""What the scripts rely on and a reader can skip: flags and one-line errors, safe file writes, the checks that
refuse damaged or hostile files, and the fast CPU formulation of the training step."""
