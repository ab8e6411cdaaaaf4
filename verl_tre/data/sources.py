"""Data-source names and prompt texts shared by data preparation and the reward dispatcher.

The ``data_source`` column of every prepared row is one of these strings; verl groups validation metrics
by it and the reward dispatcher (:mod:`verl_tre.utils.reward_score`) routes on it. This module imports
nothing heavy so that reward workers can use it cheaply.
"""

MATH = "DigitalLearningGmbH/MATH-lighteval"
MATH500 = "HuggingFaceH4/MATH-500"
AIME_2024 = "HuggingFaceH4/aime_2024"
AIME_2022_2024 = "AI-MO/aimo-validation-aime"
COUNTDOWN = "countdown"
COUNTDOWN_HUB = "Jiayi-Pan/Countdown-Tasks-3to4-Unique"
ARITHMETIC = "arithmetic"
HH = "trl-lib/ultrafeedback_binarized"

# Sources scored by the last-\boxed rule against a reference answer.
MATH_LIKE = frozenset({MATH, MATH500, AIME_2024, AIME_2022_2024})

MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."

COUNTDOWN_TEMPLATE = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
    "tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)

# Two-operand addition for small real models (the real-LM study): SmolLM2-135M-Instruct answers about a fifth
# of these correctly when sampled at temperature 1, so it earns reward from the first step.
ARITHMETIC_TEMPLATE = "What is {a} + {b}? Answer with just the number."
