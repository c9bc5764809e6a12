"""Demo data, apart from the library's data layer (dwjax/data): what `dwjax make-demo-data` and `dwjax
get-game-speech` write, for trying the pipeline end to end without a dataset of one's own.

    synthesis.py     sentences spoken by flite / espeak-ng voices -> 16 kHz FLAC + JSONL manifests
    sentences.py     the seeded English sentence generator and `multilingual_sentences.tsv` (sentences in other
                     languages, each with its English translation)
    game_speech.py   real acted speech extracted from two freeware games in Debian main (no transcripts)

Both write ordinary dwjax manifests (dwjax/data/manifest.py), which the rest of dwjax reads like any dataset.
"""
