"""Objectives composed by config: a weighted sum of terms sharing one student.

    objective:
      name: compose
      options:
        terms:
          - {name: dmd, weight: 1.0, options: {num_steps: 1, gan_weight: 0}}
          - {name: adversarial, weight: 0.05, options: {real: data}}

    L_student = sum_k w_k L_k(x0)    x0 = the first term's student sample, drawn once per update

The first term defines the student: how it is sampled in training (its draw is handed to every term), its update
cadence, stages and exported sampling spec. Later terms must score a sample from x0 alone (dmd, vsd, adversarial),
so consistency and progressive, whose losses need their own draw's x_t and t, come first. Each other network
(a fake score, a discriminator) belongs to one term and trains on that term's own loss, unweighted: a weight
scales a term's pull on the student, not its critic's learning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StepdistillError
from .base import Batch, Objective, get_objective, register


@dataclass
class ComposeOptions:
    terms: list  # [(objective class, weight, parsed options)] once parsed


@register
class Compose(Objective):
    name = "compose"
    Options = ComposeOptions
    summary = ("a weighted sum of terms on one student, e.g. dmd + adversarial (DMD2), consistency + adversarial "
               "(PCM-adv), progressive + adversarial (Lightning)")
    usage = __doc__.split("\n", 1)[1].strip("\n")  # `stepdistill objectives -v` prints it

    @classmethod
    def parse_options(cls, options: dict):
        unknown = set(options or {}) - {"terms"}
        terms = (options or {}).get("terms")
        if unknown or not isinstance(terms, list) or not terms:
            raise StepdistillError("objective 'compose' takes objective.options.terms: a list of {name, weight, "
                                   "options} (see `stepdistill objectives -v`)")
        parsed = []
        for i, term in enumerate(terms):
            where = f"objective.options.terms[{i}]"
            if not isinstance(term, dict) or "name" not in term or set(term) - {"name", "weight", "options"}:
                raise StepdistillError(f"{where} must be a mapping with 'name' and optional 'weight' and 'options'")
            if term["name"] == cls.name:
                raise StepdistillError(f"{where}: a composition cannot contain another 'compose'")
            weight = term.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise StepdistillError(f"{where}.weight must be a number >= 0, got {weight!r}")
            term_cls = get_objective(term["name"])
            try:
                opts = term_cls.parse_options(term.get("options") or {})
            except StepdistillError as err:
                raise StepdistillError(f"{where} ({term['name']}): {err}") from None
            if i > 0 and term_cls.needs_own_sample:
                raise StepdistillError(f"{where}: '{term['name']}' scores only its own student sample; list it "
                                       "first (the first term draws the student for all)")
            parsed.append((term_cls, float(weight), opts))
        return ComposeOptions(parsed)

    def __init__(self, setup, options: ComposeOptions):
        super().__init__(setup, options)
        self.terms = [term_cls(setup, opts) for term_cls, _, opts in options.terms]
        self.weights = [w for _, w, _ in options.terms]
        names = [t.name for t in self.terms]
        self.labels = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
        self.sampler = self.terms[0]
        for term in self.terms[1:]:
            term.sampler = self.sampler  # the adversarial term's discriminator draws the same student
            if term.stages():
                raise StepdistillError(f"term '{term.name}' has stages; only the first term of a composition may")
        self.needs_images = any(t.needs_images for t in self.terms)
        self.declared = [term.networks() for term in self.terms]
        self.owner: dict[str, int] = {}
        for i, nets in enumerate(self.declared):
            for net in nets:
                if net == "student":
                    continue
                if net in self.owner:
                    raise StepdistillError(f"terms '{self.labels[self.owner[net]]}' and '{self.labels[i]}' both train "
                                           f"a '{net}' network; keep one (e.g. dmd's gan_weight=0 beside an "
                                           "adversarial term)")
                self.owner[net] = i

    def networks(self):
        nets = dict(self.declared[0])  # the student as the first term trains it (rate, cadence, parameters)
        for net, i in self.owner.items():
            nets[net] = self.declared[i][net]
        return nets

    def use_wrapped(self, wrapped):
        super().use_wrapped(wrapped)
        for term, nets in zip(self.terms, self.declared):
            term.use_wrapped({net: wrapped[net] for net in nets})

    def losses(self, network: str, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        if network != "student":
            return self.terms[self.owner[network]].losses(network, batch, gen)
        sample = self.sampler.draw_student(batch, gen, train=True)  # once, for every term
        out, total = {}, 0.0
        for term, label, weight in zip(self.terms, self.labels, self.weights):
            losses = term.student_losses(sample, batch, gen)
            total = total + weight * losses["loss"]
            out.update({f"{label}/{k}": v.detach() for k, v in losses.items()})
        out["loss"] = total
        return out

    def after_update(self, network: str) -> None:
        for term, nets in zip(self.terms, self.declared):
            if network in nets:
                term.after_update(network)

    def stages(self):
        return self.sampler.stages()

    def begin_stage(self, index, source):
        self.sampler.begin_stage(index, source)

    def state_dict(self):
        return {str(i): term.state_dict() for i, term in enumerate(self.terms)}

    def load_state_dict(self, state):
        for i, term in enumerate(self.terms):
            term.load_state_dict(state.get(str(i), {}))

    def student_spec(self):
        spec = self.sampler.student_spec()
        spec.objective = "+".join(self.labels)
        return spec
