"""Fine-tunes CNNs from catalog snapshots; imported lazily by the CLI (torch and fastai are heavy)."""
