"""Models: the contract (model.json and its schema), the repository on disk, the checks a graph
must pass, the ONNX Runtime runner with its state-moving graphs, and `rnnserve import`. May
import ops and errors."""
