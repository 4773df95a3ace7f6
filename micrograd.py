"""micrograd: a scalar autograd engine and a tiny neural-net library, fit to two moons.

What you learn: backpropagation is the chain rule run backwards over a graph of scalar
operations. Each op records its local derivatives; `backward()` walks the graph in
reverse topological order and *adds* local derivative x output gradient into each input,
since dL/dx sums over every use of x. An MLP is just Values.

How to run (no GPU command: this is Python floats, one operation at a time):
    python micrograd.py          # a 2-16-16-1 MLP on two moons, boundary drawn (~10 s)
    python micrograd.py --check  # compare every gradient with torch autograd in float64
Depends on: nothing from this repo; numpy makes the data, only --check imports torch.
References: Rumelhart et al., "Learning representations by back-propagating errors",
Nature 1986; arXiv:1502.05767
"""
import argparse
import dataclasses
import gc
import inspect
import math
import random
import re

import numpy as np

@dataclasses.dataclass
class MicrogradConfig:
    """Train a small MLP on a scalar autograd engine, or check it against torch."""
    # data
    n_samples: int = 100  # training points (two moons), half per class
    noise: float = 0.1  # std of the gaussian noise on each point, in moon radii (0-0.3)
    # model
    n_layer: int = 2  # hidden layers
    n_hidden: int = 16  # tanh neurons per hidden layer
    # optimizer
    max_iters: int = 100  # full-batch gradient descent steps
    learning_rate: float = 2.0  # initial step size, decays linearly to 10% of it
    log_interval: int = 10  # print loss and accuracy every this many steps
    # system
    seed: int = 1337  # seeds the data, the weight init and --check's random graphs
    check: bool = False  # instead: check 200 random graphs' gradients against torch

# -----------------------------------------------------------------------------
# the engine: a scalar that remembers how it was computed

class Value:
    """A float that remembers how it was made: x = Value(2.0); (x * 3 + 1).backward()
    sets x.grad = 3.0."""
    __slots__ = ("data", "grad", "_prev", "_local")  # a step makes ~80k of these: small

    def __init__(self, data, _prev=(), _local=()):
        self.data = float(data)
        self.grad = 0.0
        self._prev = _prev  # the input Values
        self._local = _local  # d(self)/d(input) for each of them

    # each op computes its output and its local derivatives; backward needs nothing more
    def __add__(self, other):  # d(a+b)/da = d(a+b)/db = 1
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data + other.data, (self, other), (1.0, 1.0))
    def __mul__(self, other):  # d(ab)/da = b, d(ab)/db = a
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data * other.data, (self, other), (other.data, self.data))
    def __pow__(self, p):  # d(x^p)/dx = p x^(p-1)
        if not isinstance(p, (int, float)):
            raise TypeError(f"Value ** {type(p).__name__}: an exponent must be a number")
        if self.data < 0 and p % 1:  # Python would return a complex number
            raise ValueError(f"{self.data} ** {p}: a negative base needs an int exponent")
        if self.data == 0 and p < 1:  # 0 ** -1 divides by zero; 0 ** 0.5: infinite slope
            raise ValueError(f"0 ** {p} has no finite derivative; shift the base first, "
                             f"e.g. (x + 1e-9) ** {p}")
        return Value(self.data ** p, (self,), (p * self.data ** (p - 1),))
    def exp(self):  # d(e^x)/dx = e^x
        return Value(math.exp(self.data), (self,), (math.exp(self.data),))
    def log(self):  # d(ln x)/dx = 1/x
        if self.data <= 0:
            raise ValueError(f"log of a non-positive number ({self.data}); shift it "
                             f"first, e.g. (x + 1e-9).log()")
        return Value(math.log(self.data), (self,), (1.0 / self.data,))
    def tanh(self):  # d(tanh x)/dx = 1 - tanh(x)^2
        return Value(math.tanh(self.data), (self,), (1.0 - math.tanh(self.data) ** 2,))
    def relu(self):  # slope 1 where x > 0, else 0 (torch also takes 0 at exactly x = 0)
        return Value(max(self.data, 0.0), (self,), (float(self.data > 0),))

    # everything else is built from the ops above, so it needs no derivative of its own
    def __neg__(self): return self * -1
    def __sub__(self, other): return self + (-other)
    def __truediv__(self, other): return self * other ** -1  # other: a number or a Value
    def __radd__(self, other): return self + other  # 2 + x
    def __rmul__(self, other): return self * other  # 2 * x
    def __rsub__(self, other): return other + (-self)  # 2 - x
    def __rtruediv__(self, other): return other * self ** -1  # 2 / x
    def sigmoid(self): return (self * 0.5).tanh() * 0.5 + 0.5  # 1/(1+e^-x), no overflow

    def backward(self):
        """Set self.grad = 1 and add d(self)/d(node) into .grad of every graph node."""
        # topological order (each node after all its inputs) by an iterative depth-first
        # search: a recursive one hits Python's recursion limit on graphs ~1000 deep
        topo = []
        visited = set()
        stack = [(self, False)]
        while stack:
            node, inputs_done = stack.pop()
            if inputs_done:
                # an inner node's grad belongs to this pass: repeated calls add correctly
                if node._prev:
                    node.grad = 0.0
                topo.append(node)
            elif node not in visited:
                visited.add(node)
                stack.append((node, True))
                stack += [(child, False) for child in node._prev if child not in visited]
        # chain rule, output first: each node's grad is complete before it is passed on
        self.grad = 1.0
        for node in reversed(topo):
            for child, local in zip(node._prev, node._local):
                child.grad += local * node.grad

# -----------------------------------------------------------------------------
# a tiny neural-net library on top of Value

class Module:  # subclasses define parameters()
    def zero_grad(self):
        """Every parameter's .grad to 0: backward() adds into .grad, never sets it."""
        for p in self.parameters():
            p.grad = 0.0

class Neuron(Module):
    """act(w . x + b), weights ~ U(-1, 1) / sqrt(n_in): w . x starts with std < 1."""
    def __init__(self, n_in, nonlin, rng):
        self.w = [Value(rng.uniform(-1, 1) / math.sqrt(n_in)) for _ in range(n_in)]
        self.b = Value(0.0)
        self.nonlin = nonlin  # False for an output neuron, which returns the raw score
    def __call__(self, x):
        act = sum((wi * xi for wi, xi in zip(self.w, x)), self.b)
        return act.tanh() if self.nonlin else act
    def parameters(self): return self.w + [self.b]

class Layer(Module):
    def __init__(self, n_in, n_out, nonlin, rng):
        self.neurons = [Neuron(n_in, nonlin, rng) for _ in range(n_out)]
    def __call__(self, x): return [n(x) for n in self.neurons]
    def parameters(self): return [p for n in self.neurons for p in n.parameters()]

class MLP(Module):
    """Tanh hidden layers, a linear output: MLP(2, [16, 16, 1]) has
    (2+1)*16 + (16+1)*16 + 17 = 337 parameters."""
    def __init__(self, n_in, sizes, seed=0):
        rng = random.Random(seed)
        dims = [n_in] + sizes
        self.layers = [Layer(dims[i], dims[i + 1], i < len(sizes) - 1, rng)
                       for i in range(len(sizes))]
    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x[0] if len(x) == 1 else x  # a single output is a Value, not a list
    def parameters(self): return [p for lay in self.layers for p in lay.parameters()]

# -----------------------------------------------------------------------------
# helpers: data, loss, terminal plot, gradient check

def make_moons(n_samples, noise, seed):
    """(X, y): n_samples points on two interleaved half moons, standardised; y = +-1."""
    rng = np.random.default_rng(seed)
    n0 = n_samples // 2  # the first n0 points go on the upper moon, the rest below
    t = rng.uniform(0, math.pi, n_samples)
    upper = np.stack([np.cos(t), np.sin(t)], 1)
    lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    on_upper = (np.arange(n_samples) < n0)[:, None]
    X = np.where(on_upper, upper, lower) + rng.normal(0, noise, (n_samples, 2))
    X = (X - X.mean(0)) / X.std(0)  # zero mean, unit variance: tanh starts near linear
    return X.tolist(), [-1.0] * n0 + [1.0] * (n_samples - n0)

def loss_and_accuracy(model, X, y):
    # logistic loss log(1 + e^(-y*score)): near 0 when sign(score) = y, with a margin
    scores = [model(x) for x in X]
    loss = sum(((-yi * s).exp() + 1).log() for yi, s in zip(y, scores)) / len(X)
    accuracy = sum((s.data > 0) == (yi > 0) for yi, s in zip(y, scores)) / len(X)
    return loss, accuracy

def draw_boundary(model, X, y, width=60, height=24):
    # '.' where the model says -1, '#' where +1; the training points on top: o -1, x +1
    lo = np.min(X, 0) - 0.3
    hi = np.max(X, 0) + 0.3
    xs = np.linspace(lo[0], hi[0], width)
    grid = [["#" if model([a, b]).data > 0 else "." for a in xs]
            for b in np.linspace(hi[1], lo[1], height)]  # row 0 is the top
    for (a, b), label in zip(X, y):
        row = round((hi[1] - b) / (hi[1] - lo[1]) * (height - 1))
        col = round((a - lo[0]) / (hi[0] - lo[0]) * (width - 1))
        grid[row][col] = "x" if label > 0 else "o"
    return "\n".join("".join(line) for line in grid)

# every operation of the engine; the same lambdas run on Values and on torch tensors
OPS = [
    lambda a, b, p: a + b, lambda a, b, p: a - b, lambda a, b, p: a * b,
    lambda a, b, p: a / b, lambda a, b, p: a ** p, lambda a, b, p: -a,
    lambda a, b, p: p + a, lambda a, b, p: p - a, lambda a, b, p: p * a,
    lambda a, b, p: p / a, lambda a, b, p: a.exp(), lambda a, b, p: a.log(),
    lambda a, b, p: a.tanh(), lambda a, b, p: a.relu(), lambda a, b, p: a.sigmoid(),
]

def check_against_torch(seed, n_graphs=200):
    """The max |ours - torch| / max(1, |torch|) over values and grads of n_graphs random
    expressions (every op, shared sub-expressions) made of Values and float64 tensors."""
    try:  # deliberately optional: only this check needs torch
        import torch
    except ImportError:
        raise SystemExit("micrograd.py: error: --check compares with torch autograd, "
                         "which is not installed: pip install torch") from None
    rng = random.Random(seed)
    worst = 0.0
    for _ in range(n_graphs):
        leaves = [rng.uniform(-2, 2) for _ in range(rng.randint(1, 4))]
        ours = [Value(v) for v in leaves]
        ref = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in leaves]
        for _ in range(rng.randint(1, 30)):
            # the inputs are any earlier nodes, so sub-expressions get reused
            op = rng.choice(OPS)
            i = rng.randrange(len(ours))
            j = rng.randrange(len(ours))
            p = rng.choice([2, 3, -1, 0.5, 1.7])  # the power, or the 2 in 2 + x, 2 * x
            try:  # skip ops outside their domain (log 0, 0 ** -1, overflow), huge values
                node = op(ours[i], ours[j], p)
            except (ValueError, ZeroDivisionError, OverflowError):
                continue
            if abs(node.data) < 1e3:
                ours.append(node)
                ref.append(op(ref[i], ref[j], p))
                ref[-1].retain_grad()  # torch keeps .grad only for leaves unless asked
        sum(ours[1:], ours[0]).backward()  # the sum reaches every node
        sum(ref[1:], ref[0]).backward()
        for x, t in zip(ours, ref):  # every node: its value and its gradient
            for a, b in ((x.data, t.item()), (x.grad, t.grad.item())):
                worst = max(worst, abs(a - b) / max(1.0, abs(b)))
    return worst

def parse_args(config_class, argv=None):
    """gpt.parse_args, copied so this file stands alone: a config from --name=value
    flags, one per field, typed by its default; -h shows each default and comment."""
    def to_bool(text):  # type=bool would turn "False" into True
        if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
            raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    source = inspect.getsource(config_class)
    comments = dict(re.findall(r"\n\s+(\w+): \w+ = .*?  # (.*)", source))
    parser = argparse.ArgumentParser(description=config_class.__doc__, allow_abbrev=False)
    for field in dataclasses.fields(config_class):
        kind = type(field.default)
        help = comments.get(field.name, "").replace("%", "%%")  # argparse formats help with %
        extra = dict(type=kind)
        if kind is bool:  # a bare flag (`--bench`) means True
            extra = dict(type=to_bool, nargs="?", const=True)
        parser.add_argument(f"--{field.name}", default=field.default, metavar=kind.__name__,
                            help=f"{help} (default: {field.default!r})", **extra)
    return config_class(**vars(parser.parse_args(argv)))

# -----------------------------------------------------------------------------
# the run

def main(cfg):
    # --- setup: validate the flags before any work
    low = dict(n_samples=2, noise=0, n_layer=1, n_hidden=1, max_iters=1, log_interval=1)
    bad = [f"--{k}={getattr(cfg, k)}" for k, m in low.items() if getattr(cfg, k) < m]
    if bad:
        need = ", ".join(f"--{k} >= {m}" for k, m in low.items())
        raise SystemExit(f"micrograd.py: error: invalid {', '.join(bad)}; need {need}")
    print(dataclasses.asdict(cfg))
    if cfg.check:
        worst = check_against_torch(cfg.seed)
        print(f"200 random graphs: max relative difference to torch {worst:.2e}")
        return {"max_diff": worst}
    # --- data and model
    X, y = make_moons(cfg.n_samples, cfg.noise, cfg.seed)
    model = MLP(2, [cfg.n_hidden] * cfg.n_layer + [1], seed=cfg.seed)
    print(f"{len(X)} points, an MLP with {len(model.parameters())} parameters")
    # --- loop: full-batch gradient descent. Graphs have no reference cycles, so pausing
    # the cycle collector (it rescans every live node again and again) is safe: 3x faster
    gc.disable()
    try:
        for step in range(cfg.max_iters + 1):  # the last pass only measures the model
            loss, accuracy = loss_and_accuracy(model, X, y)
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                print(f"step {step:5d}/{cfg.max_iters} | loss {loss.data:.4f} | "
                      f"accuracy {accuracy:.0%}")
            if step < cfg.max_iters:
                model.zero_grad()
                loss.backward()
                lr = cfg.learning_rate * (1.0 - 0.9 * step / cfg.max_iters)
                for p in model.parameters():
                    p.data -= lr * p.grad
        print(draw_boundary(model, X, y))
    finally:
        gc.enable()
    return {"loss": loss.data, "accuracy": accuracy}

if __name__ == "__main__":
    main(parse_args(MicrogradConfig))
