"""The frozen side: backbones, datasets, few-shot sampling and the feature stores. Imports neither ``adapters`` nor
the application (``fewclip``)."""
