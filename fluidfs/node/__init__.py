"""The node: composes the parts over one state directory and runs them in one trio.run."""
