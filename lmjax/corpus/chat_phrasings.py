"""Phrasing tables for the embedded chat dataset built by `lmjax.corpus.stdlib_chat` (pure data, no logic).

System prompts, question templates per question type, and identity questions with their answers (harmful
requests, refusals and look-alikes are in `lmjax.corpus.safety_phrasings`). Templates are `str.format`
strings with fields {q} qualified name, {m} module, {n} name within the module, {k} keyword and {t} help
topic. Edit or extend them to change the dataset's phrasing, and bump `CHAT_CORPUS_VERSION` in
`stdlib_chat` so cached copies regenerate.
"""

SYSTEM_PROMPTS = [
    "You are lmjax-chat, a small assistant that answers questions about the Python standard library.",
    "You are a helpful assistant for Python programmers. Answer briefly.",
    "Answer questions about Python modules, classes and functions in one or two sentences.",
    "You are lmjax-chat. Be concise and accurate.",
]

WHAT_DOES = [
    "What does {q} do?", "What is {q} for?", "Explain {q}.", "Can you tell me what {q} does?",
    "What's the purpose of {q}?", "Describe {q} briefly.", "In the {m} module, what does {n} do?",
    "I saw {q} in some code. What does it do?", "Quick question: what does {q} do?",
    "What is the job of {n} in {m}?", "Give me a one-line summary of {q}.", "How would you describe {q}?",
]
WHAT_CLASS = [
    "What is the {q} class?", "What does the class {q} represent?", "What is {n} in the {m} module?",
    "Tell me about the {q} class.",
]
SIGNATURE = [
    "What is the signature of {q}?", "How do I call {q}?", "What arguments does {q} take?",
    "Show me the signature of {q}.", "What parameters does {n} from {m} accept?",
    "What are the parameters of {q}?", "How is {q} called?", "Which arguments can I pass to {q}?",
]
WHICH_MODULE = [
    "Which module provides {n}?", "Where does {n} come from?", "What module is {n} in?",
    "Which standard library module has {n}?", "Where can I import {n} from?", "How do I import {n}?",
    "In which module is {n} defined?", "I need {n}. Which module do I import?",
]
MODULE_FOR = [
    "What is the {m} module for?", "What does the {m} module do?", "Explain the {m} module.",
    "What is {m} used for?", "Tell me about the {m} module.", "Why would I use {m}?",
    "Give me a summary of the {m} module.", "What's in the {m} module?",
]
FOLLOW_SIGNATURE = [
    "And its signature?", "How do I call it?", "What arguments does it take?", "And the signature?",
    "Which parameters does it accept?", "Can you show the signature too?",
]
FOLLOW_MODULE = [
    "Which module is that in?", "Where do I import it from?", "And which module provides it?",
    "Where does it live?", "How do I import it?",
]
FOLLOW_CONTENTS = [
    "What does it provide?", "What can I find in it?", "Name a few things it has.",
    "Which functions or classes does it offer?", "What are its main names?",
]
KEYWORD_QUESTIONS = [
    "What does the `{k}` keyword do?", "What is `{k}` used for in Python?", "Explain the {k} keyword.",
    "How does `{k}` work?", "What does {k} mean in Python?", "Tell me about the `{k}` keyword.",
    "When do I use `{k}`?",
]
TOPIC_QUESTIONS = [
    "Tell me about {t}.", "What should I know about {t}?", "Explain {t} in Python.",
    "Can you summarize {t}?", "What does the Python reference say about {t}?",
]

IDENTITY = {
    "I am lmjax-chat, a small assistant trained on the Python standard library documentation. "
    "Ask me what a module, class or function does.": [
        "Who are you?", "What are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
        "Are you a person?", "What should I call you?", "Who am I talking to?", "Are you ChatGPT?",
        "Which assistant is this?",
    ],
    "I can explain what Python standard library modules, classes and functions do, show their signatures, "
    "tell you which module provides something, and describe keywords and statements.": [
        "What can you do?", "How can you help me?", "What are you good at?", "What do you know about?",
        "What kind of questions can I ask you?", "What topics do you cover?", "What are your skills?",
        "How do I use you?",
    ],
    "I was trained with lmjax, a small JAX framework for language models, on text from the Python "
    "documentation that ships with the interpreter.": [
        "Who made you?", "How were you trained?", "Who built you?", "What were you trained on?",
        "Where does your knowledge come from?", "Which framework trained you?",
    ],
    "I am a small model, so I can be wrong. Check the official Python documentation for anything important.": [
        "Are you always right?", "Can I trust your answers?", "Do you make mistakes?", "How accurate are you?",
        "Should I double-check what you say?",
    ],
    "Hello! I am lmjax-chat. Ask me about a Python module, class, function or keyword.": [
        "Hi!", "Hello", "Hey there", "Good morning!", "Hi, can you help me?", "Hello, anyone there?",
    ],
}
