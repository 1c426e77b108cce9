import os
import tempfile

# NNI resolves ~/nni-experiments (its experiment manifest) when it is imported: point HOME at a throwaway folder
# before any test imports nni, so the suite never writes into the user's home.
os.environ['HOME'] = tempfile.mkdtemp(prefix='nni-idarts-test-home-')
