"""Data layer: WebDataset shard reading (datamodule, pipeline) and writing (shard_writer)."""


def __getattr__(name):  # lazy: importing the shard writer should not import Lightning
    if name == "AudioDataModule":
        from .datamodule import AudioDataModule

        return AudioDataModule
    if name == "DataStatsLogger":
        from .stats import DataStatsLogger

        return DataStatsLogger
    raise AttributeError(name)
