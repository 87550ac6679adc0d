"""Workload B of bench/semantic.py: hand-written question groups and near-miss questions (no templates, no slots).

Written independently of workload A (the generated families in bench/semantic.py) and committed before the
verification step it measures. Each group is ``(original, [paraphrases], [(kind, near-miss), ...])``: the original
is asked first, every paraphrase must get the original's answer, and every near-miss is another question whose
right answer differs (the deterministic upstream answers each with its own id). Near-miss kinds:

- ``number``: another number or identifier (year, version, flight number, amount, count);
- ``time``: another date or relative time word (today / yesterday / tomorrow, weekday, month);
- ``entity``: another named entity (country, city, person, company, language, tool, drug);
- ``negation``: the same question negated (or a negation removed);
- ``direction``: a conversion or relation in the other direction ("A to B" vs "B to A");
- ``topic``: another ordinary (not named) word that changes the answer (cats vs dogs): no lexical check is
  expected to catch these; they are here so that the measurement does not only contain what a checker can see.
"""

from __future__ import annotations

Group = tuple[str, list[str], list[tuple[str, str]]]

GROUPS: dict[str, list[Group]] = {
    "code": [
        (
            "How do I convert an integer to a string in Python?",
            ["What's the way to turn an int into a str in Python?", "Python: convert a number to a string"],
            [("direction", "How do I convert a string to an integer in Python?")],
        ),
        (
            "How do I undo the last commit in git?",
            ["How can I revert my most recent git commit?", "git: how to undo my last commit"],
            [("number", "How do I undo the last 3 commits in git?")],
        ),
        (
            "How do I list all running Docker containers?",
            ["Which command shows the Docker containers that are running?", "Show running containers in Docker"],
            [("negation", "How do I list all Docker containers that are not running?")],
        ),
        (
            "What is the difference between an interface and an abstract class in Java?",
            [
                "Java: abstract class vs interface, what's the difference?",
                "How do interfaces differ from abstract classes in Java?",
            ],
            [("entity", "What is the difference between an interface and an abstract class in C#?")],
        ),
        (
            "How do I read a JSON file in Go?",
            ["What's the way to parse a JSON file in Golang?", "Go: load and decode a JSON file"],
            [("entity", "How do I read a JSON file in Rust?"), ("direction", "How do I write a JSON file in Go?")],
        ),
        (
            "What's new in Python 3.12?",
            ["Which features were added in Python 3.12?", "What changed in the Python 3.12 release?"],
            [("number", "What's new in Python 3.11?")],
        ),
        (
            "How do I convert a JavaScript object to a JSON string?",
            ["How can I serialize a JS object into JSON text?", "Turn a JavaScript object into a JSON string"],
            [("direction", "How do I convert a JSON string to a JavaScript object?")],
        ),
        (
            "How do I check whether a key exists in a Python dictionary?",
            [
                "Python: test if a dict has a given key",
                "What is the best way to see if a key is in a dictionary in Python?",
            ],
            [("negation", "How do I check that a key does not exist in a Python dictionary?")],
        ),
        (
            "How do I delete a local branch in git?",
            ["What's the git command to remove a local branch?", "git: delete a branch on my machine"],
            [("topic", "How do I delete a remote branch in git?")],
        ),
        (
            "How do I install Node.js version 18 on Ubuntu?",
            ["What's the way to set up Node 18 on Ubuntu?", "Ubuntu: install Node.js 18"],
            [
                ("number", "How do I install Node.js version 20 on Ubuntu?"),
                ("entity", "How do I install Node.js version 18 on Windows?"),
            ],
        ),
        (
            "How do I get the current date in JavaScript?",
            ["JavaScript: how to get today's date", "What code returns the current date in JS?"],
            [("entity", "How do I get the current date in PHP?")],
        ),
        (
            "How do I convert a list to a tuple in Python?",
            ["Python: turn a list into a tuple", "What's the way to make a tuple out of a list in Python?"],
            [("direction", "How do I convert a tuple to a list in Python?")],
        ),
        (
            "How do I remove the first element of an array in JavaScript?",
            [
                "JavaScript: drop the first item of an array",
                "What's the way to delete the first element from a JS array?",
            ],
            [("topic", "How do I remove the last element of an array in JavaScript?")],
        ),
        (
            "How do I expose port 8080 in a Dockerfile?",
            ["Dockerfile: how to expose port 8080", "What line in a Dockerfile exposes port 8080?"],
            [("number", "How do I expose port 3000 in a Dockerfile?")],
        ),
        (
            "How do I convert Celsius to Fahrenheit in Excel?",
            [
                "What's the Excel formula to turn Celsius into Fahrenheit?",
                "Excel: Celsius to Fahrenheit conversion formula",
            ],
            [("direction", "How do I convert Fahrenheit to Celsius in Excel?")],
        ),
        (
            "How do I create a virtual environment with Python 3.10?",
            ["Make a venv that uses Python 3.10", "What's the command to create a Python 3.10 virtual environment?"],
            [("number", "How do I create a virtual environment with Python 3.8?")],
        ),
        (
            "Why is my React component rendering twice?",
            ["Why does my React component render two times?", "React component renders twice, why?"],
            [
                ("entity", "Why is my Vue component rendering twice?"),
                ("negation", "Why is my React component not rendering?"),
            ],
        ),
        (
            "How do I merge two dictionaries in Python?",
            ["Python: combine two dicts into one", "What's the best way to merge a pair of dictionaries in Python?"],
            [("number", "How do I merge three dictionaries in Python?")],
        ),
        (
            "How do I rename a column in pandas?",
            ["pandas: change the name of a column", "What's the way to rename a DataFrame column in pandas?"],
            [("topic", "How do I rename an index in pandas?")],
        ),
        (
            "How do I make a POST request with curl?",
            ["What's the curl command to send a POST request?", "curl: send a POST"],
            [("topic", "How do I make a DELETE request with curl?")],
        ),
        (
            "How do I convert bytes to a string in Python 3?",
            ["Python 3: decode bytes into a str", "What's the way to turn bytes into a string in Python 3?"],
            [("direction", "How do I convert a string to bytes in Python 3?")],
        ),
        (
            "What does the HTTP status code 404 mean?",
            ["What is an HTTP 404 error?", "Meaning of HTTP status 404"],
            [
                ("number", "What does the HTTP status code 403 mean?"),
                ("number", "What does the HTTP status code 504 mean?"),
            ],
        ),
    ],
    "factual": [
        (
            "What is the capital of Nigeria?",
            ["Which city is Nigeria's capital?", "Nigeria's capital city is what?"],
            [("entity", "What is the capital of Niger?")],
        ),
        (
            "Who painted The Starry Night?",
            ["Which artist painted The Starry Night?", "The Starry Night was painted by whom?"],
            [("entity", "Who painted The Night Watch?")],
        ),
        (
            "When did the Berlin Wall fall?",
            ["In what year did the Berlin Wall come down?", "What year was the fall of the Berlin Wall?"],
            [("topic", "When was the Berlin Wall built?")],
        ),
        (
            "How many moons does Mars have?",
            ["What is the number of moons of Mars?", "Mars has how many moons?"],
            [("entity", "How many moons does Jupiter have?")],
        ),
        (
            "Who was the first president of the United States?",
            ["Who served as the first US president?", "Name the first president of the USA."],
            [("number", "Who was the 16th president of the United States?")],
        ),
        (
            "What is the boiling point of water at sea level in Celsius?",
            [
                "At sea level, water boils at what temperature in Celsius?",
                "Boiling point of water in Celsius at sea level?",
            ],
            [("entity", "What is the boiling point of water at sea level in Fahrenheit?")],
        ),
        (
            "Who won the Nobel Prize in Physics in 1921?",
            ["Which scientist received the 1921 Nobel Prize in Physics?", "The 1921 Physics Nobel went to whom?"],
            [
                ("number", "Who won the Nobel Prize in Physics in 1922?"),
                ("topic", "Who won the Nobel Prize in Chemistry in 1921?"),
            ],
        ),
        (
            "What is the largest desert in Africa?",
            ["Which desert is the biggest in Africa?", "Africa's largest desert is called what?"],
            [("entity", "What is the largest desert in Asia?"), ("topic", "What is the smallest desert in Africa?")],
        ),
        (
            "How long is the Nile River?",
            ["What is the length of the Nile?", "How many kilometres long is the Nile River?"],
            [("entity", "How long is the Amazon River?")],
        ),
        (
            "What language is spoken in Brazil?",
            ["Which language do people speak in Brazil?", "What is the official language of Brazil?"],
            [("entity", "What language is spoken in Belgium?")],
        ),
        (
            "Who wrote One Hundred Years of Solitude?",
            [
                "Who is the author of One Hundred Years of Solitude?",
                "One Hundred Years of Solitude was written by whom?",
            ],
            [("topic", "When was One Hundred Years of Solitude published?")],
        ),
        (
            "What is the chemical symbol for gold?",
            ["Which element symbol stands for gold?", "Gold's chemical symbol is what?"],
            [
                ("direction", "Which element has the chemical symbol Au?"),
                ("topic", "What is the chemical symbol for silver?"),
            ],
        ),
        (
            "Which planet is closest to the Sun?",
            ["What planet orbits nearest to the Sun?", "Name the planet nearest the Sun."],
            [("topic", "Which planet is farthest from the Sun?")],
        ),
        (
            "How many bones are in the adult human body?",
            ["How many bones does an adult human have?", "Number of bones in a grown-up human body?"],
            [("topic", "How many bones are in a newborn baby's body?")],
        ),
        (
            "What was the population of Canada in 2020?",
            ["How many people lived in Canada in 2020?", "Canada's population in 2020?"],
            [
                ("number", "What was the population of Canada in 1990?"),
                ("entity", "What was the population of Australia in 2020?"),
            ],
        ),
        (
            "Who discovered penicillin?",
            ["Which scientist discovered penicillin?", "Penicillin was discovered by whom?"],
            [("topic", "Who discovered insulin?")],
        ),
        (
            "Is Australia a continent?",
            ["Does Australia count as a continent?", "Is Australia considered a continent?"],
            [("negation", "Why is Australia not a continent?"), ("entity", "Is Greenland a continent?")],
        ),
        (
            "What is the tallest building in the world?",
            ["Which building is the tallest on Earth?", "Name the world's tallest building."],
            [("entity", "What is the tallest building in Europe?")],
        ),
        (
            "When did World War I start?",
            ["In what year did the First World War begin?", "What year did WW1 start?"],
            [("number", "When did World War II start?"), ("topic", "When did World War I end?")],
        ),
        (
            "How far is Paris from London?",
            ["What is the distance between Paris and London?", "Distance from London to Paris?"],
            [("entity", "How far is Paris from Madrid?")],
        ),
        (
            "What is the speed of light in a vacuum?",
            ["How fast does light travel in vacuum?", "Speed of light in vacuum?"],
            [("topic", "What is the speed of sound in air?")],
        ),
        (
            "Who was Cleopatra married to?",
            ["Who were Cleopatra's husbands?", "Whom did Cleopatra marry?"],
            [("entity", "Who was Nefertiti married to?")],
        ),
    ],
    "chat": [
        (
            "Tell me a joke about dogs.",
            ["Do you know a funny dog joke?", "Make me laugh with a joke about dogs."],
            [("topic", "Tell me a joke about penguins.")],
        ),
        (
            "I can't sleep, any tips?",
            ["I'm having trouble falling asleep, what should I do?", "Got any advice for when I can't sleep?"],
            [("negation", "I sleep too much, any tips?")],
        ),
        (
            "Write a short poem about autumn.",
            ["Can you write me a little autumn poem?", "Compose a brief poem about the fall season."],
            [("topic", "Write a short poem about spring.")],
        ),
        (
            "What should I cook for dinner tonight?",
            ["Any ideas for tonight's dinner?", "Suggest something to cook for dinner tonight."],
            [("time", "What should I cook for dinner tomorrow?")],
        ),
        (
            "Give me a fun fact about octopuses.",
            ["Tell me something interesting about octopuses.", "Share a fun octopus fact."],
            [("topic", "Give me a fun fact about sharks.")],
        ),
        (
            "How do I say thank you in Japanese?",
            ["What's 'thank you' in Japanese?", "Japanese word for thank you?"],
            [("entity", "How do I say thank you in Korean?"), ("direction", "What does arigato mean in English?")],
        ),
        (
            "Recommend a book for a long flight.",
            ["What's a good book to read on a long flight?", "Suggest something to read on a long plane trip."],
            [("negation", "Recommend a book that is not too long for a flight.")],
        ),
        (
            "I'm nervous about my job interview tomorrow.",
            ["I have a job interview tomorrow and I'm anxious.", "Feeling nervous about tomorrow's job interview."],
            [("time", "I'm nervous about my job interview next week.")],
        ),
        (
            "What's a good name for a black cat?",
            ["Suggest a name for my black cat.", "Any name ideas for a black kitten?"],
            [("topic", "What's a good name for a golden retriever?")],
        ),
        (
            "Can you help me plan a birthday party for a 5 year old?",
            ["Help me organise a 5th birthday party.", "Ideas for a party for a five-year-old's birthday?"],
            [("number", "Can you help me plan a birthday party for a 15 year old?")],
        ),
        (
            "Tell me a riddle.",
            ["Do you have a riddle for me?", "Give me a riddle to solve."],
            [("negation", "Don't tell me a riddle, tell me a story.")],
        ),
        (
            "What's the best way to start a conversation with a stranger?",
            [
                "How do I strike up a conversation with someone I don't know?",
                "Tips for starting to talk with a stranger?",
            ],
            [("topic", "What's the best way to end a conversation with a stranger?")],
        ),
        (
            "Suggest a workout I can do at home in 20 minutes.",
            ["Give me a 20-minute home workout.", "What's a quick 20 minute exercise routine for home?"],
            [("number", "Suggest a workout I can do at home in 45 minutes.")],
        ),
        (
            "How can I be more productive in the morning?",
            ["Tips to get more done in the mornings?", "What helps with morning productivity?"],
            [("topic", "How can I be more productive in the evening?")],
        ),
        (
            "Describe Paris in three words.",
            ["Give me three words that describe Paris.", "Paris in 3 words?"],
            [("entity", "Describe Rome in three words."), ("number", "Describe Paris in five words.")],
        ),
        (
            "Say something nice to me.",
            ["Could you say something kind to me?", "Tell me something nice."],
            [("negation", "Say something that is not nice to me.")],
        ),
        (
            "What game can I play with friends on a rainy day?",
            [
                "Suggest a game for friends when it's raining.",
                "Any ideas for a game to play with friends on a rainy day?",
            ],
            [("topic", "What game can I play alone on a rainy day?")],
        ),
        (
            "Translate good morning into Spanish.",
            ["How do you say good morning in Spanish?", "Good morning in Spanish?"],
            [("entity", "Translate good morning into Italian."), ("direction", "Translate buenos dias into English.")],
        ),
        (
            "Tell me a bedtime story about a dragon.",
            ["Could you tell me a dragon story for bedtime?", "I'd like a bedtime story with a dragon."],
            [("topic", "Tell me a bedtime story about a unicorn.")],
        ),
        (
            "What are some fun things to do on a Saturday?",
            ["Give me ideas for a fun Saturday.", "What can I do for fun this Saturday?"],
            [("time", "What are some fun things to do on a Monday?")],
        ),
        (
            "Can you recommend a podcast about history?",
            ["Suggest a good history podcast.", "What's a history podcast worth listening to?"],
            [("topic", "Can you recommend a podcast about science?")],
        ),
        (
            "How do I politely decline an invitation?",
            ["What's a polite way to turn down an invitation?", "Help me say no to an invitation nicely."],
            [("negation", "How do I politely accept an invitation?")],
        ),
    ],
    "time_sensitive": [
        (
            "Will it rain in Lisbon today?",
            ["Is rain expected in Lisbon today?", "Lisbon weather today: will it rain?"],
            [("time", "Will it rain in Lisbon tomorrow?"), ("entity", "Will it rain in Porto today?")],
        ),
        (
            "What was the Nasdaq close today?",
            ["Where did the Nasdaq close today?", "Today's Nasdaq closing level?"],
            [("time", "What was the Nasdaq close yesterday?"), ("entity", "What was the Dow Jones close today?")],
        ),
        (
            "Is flight LH400 on time today?",
            ["Is Lufthansa flight LH400 delayed today?", "What's the status of flight LH400 today?"],
            [("number", "Is flight LH401 on time today?"), ("time", "Is flight LH400 on time tomorrow?")],
        ),
        (
            "What is the USD to EUR exchange rate right now?",
            ["How many euros is one US dollar right now?", "Current dollar to euro exchange rate?"],
            [
                ("direction", "What is the EUR to USD exchange rate right now?"),
                ("entity", "What is the USD to GBP exchange rate right now?"),
            ],
        ),
        (
            "Who won the Champions League final yesterday?",
            ["Which team won yesterday's Champions League final?", "Champions League final result from yesterday?"],
            [("topic", "Who scored in the Champions League final yesterday?")],
        ),
        (
            "What's the temperature in Chicago right now?",
            ["How warm is it in Chicago at the moment?", "Current temperature in Chicago?"],
            [
                ("entity", "What's the temperature in Houston right now?"),
                ("time", "What will the temperature in Chicago be tonight?"),
            ],
        ),
        (
            "What time does the sun set in Oslo today?",
            ["When is sunset in Oslo today?", "Oslo sunset time today?"],
            [
                ("topic", "What time does the sun rise in Oslo today?"),
                ("time", "What time does the sun set in Oslo on Friday?"),
            ],
        ),
        (
            "What is Tesla's stock price right now?",
            ["How much is TSLA trading at right now?", "Current Tesla share price?"],
            [("entity", "What is Nvidia's stock price right now?")],
        ),
        (
            "Are there any delays on the London Underground this morning?",
            ["Is the Tube delayed this morning?", "London Underground delays this morning?"],
            [("negation", "Are there any lines on the London Underground with no delays this morning?")],
        ),
        (
            "What's the traffic like on the I-95 right now?",
            ["How bad is traffic on I-95 at the moment?", "Current I-95 traffic conditions?"],
            [("number", "What's the traffic like on the I-80 right now?")],
        ),
        (
            "What is the price of Bitcoin today?",
            ["How much does one Bitcoin cost today?", "Today's Bitcoin price?"],
            [("time", "What was the price of Bitcoin last week?"), ("entity", "What is the price of Solana today?")],
        ),
        (
            "Is the Golden Gate Bridge open right now?",
            ["Can I drive over the Golden Gate Bridge right now?", "Golden Gate Bridge status at the moment?"],
            [("negation", "Why is the Golden Gate Bridge not open right now?")],
        ),
        (
            "What movies are playing in cinemas this weekend?",
            ["Which films are in theaters this weekend?", "What's showing at the cinema this weekend?"],
            [("time", "What movies are playing in cinemas next weekend?")],
        ),
        (
            "What is the air quality in Delhi today?",
            ["How is the air quality in Delhi today?", "Delhi AQI today?"],
            [
                ("entity", "What is the air quality in Mumbai today?"),
                ("time", "What was the air quality in Delhi yesterday?"),
            ],
        ),
        (
            "What's the score of the Lakers game tonight?",
            ["How are the Lakers doing in tonight's game?", "Lakers game score tonight?"],
            [("entity", "What's the score of the Celtics game tonight?")],
        ),
        (
            "How much is a gallon of gas in California today?",
            ["What's the price of gas per gallon in California today?", "California gas price per gallon today?"],
            [("entity", "How much is a gallon of gas in Texas today?")],
        ),
        (
            "What are the top headlines this morning?",
            ["What's in the news this morning?", "Give me this morning's top headlines."],
            [("time", "What were the top headlines yesterday morning?")],
        ),
        (
            "Is the Louvre open today?",
            ["Can I visit the Louvre today?", "Is the Louvre museum open today?"],
            [("time", "Is the Louvre open on Tuesday?"), ("negation", "Why is the Louvre closed today?")],
        ),
        (
            "What is the UV index in Sydney today?",
            ["How high is the UV index in Sydney today?", "Sydney UV index today?"],
            [("entity", "What is the UV index in Perth today?")],
        ),
        (
            "What is the current mortgage rate for a 30-year fixed loan?",
            ["What are 30-year fixed mortgage rates right now?", "Current 30-year fixed mortgage rate?"],
            [("number", "What is the current mortgage rate for a 15-year fixed loan?")],
        ),
        (
            "How long is the wait at the JFK security checkpoint right now?",
            ["What is the current security wait time at JFK?", "JFK security line wait right now?"],
            [("entity", "How long is the wait at the LAX security checkpoint right now?")],
        ),
        (
            "What's the snow depth at Zermatt today?",
            ["How much snow is there in Zermatt today?", "Zermatt snow depth today?"],
            [("time", "What was the snow depth at Zermatt last January?")],
        ),
    ],
    "health": [
        (
            "Can I take ibuprofen with paracetamol?",
            ["Is it safe to take ibuprofen and paracetamol together?", "Can ibuprofen and paracetamol be combined?"],
            [("entity", "Can I take ibuprofen with aspirin?")],
        ),
        (
            "What is the maximum daily dose of paracetamol for an adult?",
            ["How much paracetamol can an adult take in a day at most?", "Max daily paracetamol dose for adults?"],
            [("topic", "What is the maximum daily dose of paracetamol for a child?")],
        ),
        (
            "Is it safe to drink alcohol while taking antibiotics?",
            ["Can I drink alcohol when I'm on antibiotics?", "Alcohol and antibiotics: is it safe?"],
            [("negation", "Why should I not drink alcohol while taking metronidazole?")],
        ),
        (
            "What are the early symptoms of type 2 diabetes?",
            ["What are the first signs of type 2 diabetes?", "Early warning signs of type 2 diabetes?"],
            [("number", "What are the early symptoms of type 1 diabetes?")],
        ),
        (
            "How much vitamin D should an adult take per day?",
            ["What's the daily vitamin D dose for adults?", "Recommended daily vitamin D intake for an adult?"],
            [("entity", "How much vitamin C should an adult take per day?")],
        ),
        (
            "Is a resting heart rate of 50 normal?",
            ["Is a heart rate of 50 bpm at rest okay?", "Resting pulse of 50, is that normal?"],
            [("number", "Is a resting heart rate of 110 normal?")],
        ),
        (
            "Can I get the flu shot while pregnant?",
            ["Is the flu vaccine safe during pregnancy?", "Flu shot during pregnancy: is it okay?"],
            [
                ("negation", "Why should I not get the flu shot while pregnant?"),
                ("entity", "Can I get the MMR vaccine while pregnant?"),
            ],
        ),
        (
            "How long is someone contagious with COVID-19?",
            ["For how long can a person spread COVID-19?", "How many days are you contagious with COVID?"],
            [("topic", "How long is someone contagious with chickenpox?")],
        ),
        (
            "What should I do if I have a fever of 39 degrees?",
            ["I have a 39 degree fever, what should I do?", "Fever of 39°C: what to do?"],
            [("number", "What should I do if I have a fever of 41 degrees?")],
        ),
        (
            "Can children take aspirin?",
            ["Is aspirin safe for kids?", "Should children be given aspirin?"],
            [("entity", "Can children take ibuprofen?")],
        ),
        (
            "How many hours of sleep does a teenager need?",
            ["How much sleep do teenagers need each night?", "Recommended sleep hours for a teen?"],
            [("topic", "How many hours of sleep does an elderly person need?")],
        ),
        (
            "Is it normal to feel dizzy after donating blood?",
            ["Feeling dizzy after giving blood, is that normal?", "Is dizziness after a blood donation normal?"],
            [("negation", "Is it normal to not feel anything after donating blood?")],
        ),
        (
            "What foods are high in iron?",
            ["Which foods contain a lot of iron?", "Iron-rich foods?"],
            [("topic", "What foods are high in potassium?"), ("negation", "What foods are low in iron?")],
        ),
        (
            "How often should adults get a tetanus booster?",
            ["How frequently do adults need a tetanus shot?", "Tetanus booster interval for adults?"],
            [("entity", "How often should adults get a shingles vaccine?")],
        ),
        (
            "What is a normal blood pressure for a 60 year old?",
            ["What's a healthy blood pressure at age 60?", "Normal BP for a 60-year-old?"],
            [("number", "What is a normal blood pressure for a 30 year old?")],
        ),
        (
            "Can I take melatonin every night?",
            ["Is it okay to take melatonin nightly?", "Is taking melatonin every night safe?"],
            [("topic", "Can I take melatonin during the day?")],
        ),
        (
            "What are the side effects of metformin?",
            ["Which side effects does metformin have?", "Metformin side effects?"],
            [("entity", "What are the side effects of lisinopril?")],
        ),
        (
            "Should I put ice or heat on a sprained ankle?",
            ["Is ice or heat better for an ankle sprain?", "Sprained ankle: ice or heat?"],
            [("topic", "Should I put ice or heat on a stiff neck?")],
        ),
        (
            "How much water should I drink a day?",
            ["What's the recommended daily water intake?", "How many litres of water should I drink daily?"],
            [("negation", "What happens if I don't drink water for a day?")],
        ),
        (
            "Is it safe to take omeprazole for more than 8 weeks?",
            ["Can I use omeprazole longer than 8 weeks?", "Long-term omeprazole beyond 8 weeks: safe?"],
            [("number", "Is it safe to take omeprazole for more than 2 weeks?")],
        ),
        (
            "Does caffeine raise blood pressure?",
            ["Can coffee increase blood pressure?", "Does caffeine increase blood pressure?"],
            [("topic", "Does caffeine lower blood pressure?")],
        ),
        (
            "When should I see a doctor for a headache?",
            [
                "When is a headache serious enough to see a doctor?",
                "At what point should a headache send me to a doctor?",
            ],
            [("negation", "When should I not worry about a headache?")],
        ),
    ],
    "finance": [
        (
            "What is the 401(k) contribution limit in 2024?",
            ["How much can I put in my 401(k) in 2024?", "2024 401(k) maximum contribution?"],
            [("number", "What is the 401(k) contribution limit in 2025?")],
        ),
        (
            "Should I pay off my mortgage early or invest?",
            [
                "Is it better to pay down my mortgage early or to invest the money?",
                "Mortgage prepayment vs investing: which is better?",
            ],
            [("topic", "Should I pay off my car loan early or invest?")],
        ),
        (
            "How is a Roth IRA taxed?",
            ["What are the tax rules for a Roth IRA?", "Roth IRA taxation explained"],
            [("entity", "How is a traditional IRA taxed?")],
        ),
        (
            "How do I convert dollars to euros at the best rate?",
            ["Where can I get the best rate exchanging dollars for euros?", "Best way to change USD into EUR?"],
            [("direction", "How do I convert euros to dollars at the best rate?")],
        ),
        (
            "What is a good credit score in the US?",
            ["What counts as a good US credit score?", "In the United States, what's a good credit score?"],
            [
                ("entity", "What is a good credit score in the UK?"),
                ("negation", "What is not a good credit score in the US?"),
            ],
        ),
        (
            "How much should I have saved for retirement by age 40?",
            ["What should my retirement savings be at 40?", "Retirement savings target by age 40?"],
            [("number", "How much should I have saved for retirement by age 50?")],
        ),
        (
            "What is the capital gains tax rate on stocks held for more than a year?",
            ["How are long-term capital gains on stocks taxed?", "Capital gains tax on shares held over one year?"],
            [("negation", "What is the capital gains tax rate on stocks held for less than a year?")],
        ),
        (
            "Is it better to lease or buy a car?",
            ["Should I lease a car or buy one?", "Car leasing vs buying: which is better?"],
            [("topic", "Is it better to rent or buy a house?")],
        ),
        (
            "How does compound interest work?",
            ["Can you explain compound interest?", "What is compound interest and how does it work?"],
            [("topic", "How does simple interest work?")],
        ),
        (
            "What is the standard deduction for 2023 for a single filer?",
            ["How big is the 2023 standard deduction for single filers?", "2023 standard deduction, single?"],
            [
                ("number", "What is the standard deduction for 2021 for a single filer?"),
                ("topic", "What is the standard deduction for 2023 for a married couple?"),
            ],
        ),
        (
            "Should I invest in an S&P 500 index fund?",
            ["Is an S&P 500 index fund a good investment?", "Is buying an S&P 500 index fund a good idea?"],
            [("entity", "Should I invest in a Nasdaq 100 index fund?")],
        ),
        (
            "How do I transfer money from PayPal to my bank account?",
            ["How can I move money out of PayPal into my bank?", "PayPal to bank transfer: how?"],
            [("direction", "How do I transfer money from my bank account to PayPal?")],
        ),
        (
            "What happens if I miss a credit card payment?",
            [
                "What are the consequences of missing a credit card payment?",
                "I missed a credit card payment, what happens now?",
            ],
            [
                ("number", "What happens if I miss two credit card payments?"),
                ("topic", "What happens if I miss a mortgage payment?"),
            ],
        ),
        (
            "Are dividends taxed in Canada?",
            ["Do I pay tax on dividends in Canada?", "How are dividends taxed in Canada?"],
            [("entity", "Are dividends taxed in Germany?")],
        ),
        (
            "Can I withdraw from my 401(k) before age 59 and a half?",
            ["Is early 401(k) withdrawal before 59½ allowed?", "Taking money out of a 401(k) before 59 and a half?"],
            [("negation", "Can I avoid withdrawing from my 401(k) after age 73?")],
        ),
        (
            "How much emergency fund should I have?",
            ["How big should my emergency fund be?", "What's the right size for an emergency fund?"],
            [("topic", "Where should I keep my emergency fund?")],
        ),
        (
            "What is the inheritance tax threshold in the UK?",
            ["Above what amount is inheritance tax due in the UK?", "UK inheritance tax threshold?"],
            [("entity", "What is the inheritance tax threshold in Ireland?")],
        ),
        (
            "Is it worth refinancing a mortgage from 7% to 6%?",
            ["Should I refinance my mortgage from 7 percent to 6 percent?", "Refinance from 7% down to 6%: worth it?"],
            [
                ("direction", "Is it worth refinancing a mortgage from 6% to 7%?"),
                ("number", "Is it worth refinancing a mortgage from 7% to 6.5%?"),
            ],
        ),
        (
            "How do stock options get taxed when I exercise them?",
            ["What taxes apply when I exercise my stock options?", "Taxation of exercising stock options?"],
            [("topic", "How do stock options get taxed when I sell them?")],
        ),
        (
            "Should I buy Apple shares?",
            ["Is Apple stock a good buy?", "Is it a good idea to buy shares of Apple?"],
            [("entity", "Should I buy Amazon shares?"), ("topic", "Should I sell my Apple shares?")],
        ),
        (
            "How can I improve my credit score quickly?",
            ["What's the fastest way to raise my credit score?", "Quick ways to boost my credit score?"],
            [("negation", "What lowers my credit score?")],
        ),
        (
            "What is the annual gift tax exclusion in 2024?",
            ["How much can I gift tax-free in 2024?", "2024 annual gift exclusion amount?"],
            [("number", "What is the annual gift tax exclusion in 2022?")],
        ),
    ],
    "default": [
        (
            "How do I remove a red wine stain from a carpet?",
            ["What's the best way to get red wine out of carpet?", "Red wine stain on my carpet, how do I clean it?"],
            [("topic", "How do I remove a coffee stain from a carpet?")],
        ),
        (
            "How long should I boil an egg for a soft yolk?",
            ["How many minutes to boil an egg so the yolk stays soft?", "Soft-boiled egg: how long do I boil it?"],
            [("topic", "How long should I boil an egg for a hard yolk?")],
        ),
        (
            "How do I convert a recipe from cups to grams?",
            ["How can I change a recipe's cups into grams?", "Cups to grams conversion for a recipe?"],
            [("direction", "How do I convert a recipe from grams to cups?")],
        ),
        (
            "What's the best way to learn Spanish?",
            ["How should I go about learning Spanish?", "Most effective way to learn Spanish?"],
            [("entity", "What's the best way to learn Portuguese?")],
        ),
        (
            "How often should I water a cactus?",
            ["How frequently does a cactus need watering?", "Cactus watering schedule?"],
            [("topic", "How often should I water a fern?")],
        ),
        (
            "How do I change a flat tire?",
            ["What are the steps to change a flat tyre?", "Changing a flat tire: how do I do it?"],
            [("negation", "What should I do if I can't change a flat tire?")],
        ),
        (
            "How many calories are in a banana?",
            ["What's the calorie count of a banana?", "Calories in one banana?"],
            [("number", "How many calories are in 3 bananas?"), ("topic", "How many calories are in an apple?")],
        ),
        (
            "Convert 10 miles to kilometers.",
            ["How many kilometers is 10 miles?", "10 miles in km?"],
            [("direction", "Convert 10 kilometers to miles."), ("number", "Convert 26 miles to kilometers.")],
        ),
        (
            "What is 15 percent of 80?",
            ["How much is 15% of 80?", "Calculate 15 percent of 80."],
            [("number", "What is 20 percent of 80?"), ("direction", "What percent of 15 is 80?")],
        ),
        (
            "How do I get from Heathrow to central London?",
            [
                "What's the best way to travel from Heathrow into central London?",
                "Heathrow to central London: how do I get there?",
            ],
            [
                ("direction", "How do I get from central London to Heathrow?"),
                ("entity", "How do I get from Gatwick to central London?"),
            ],
        ),
        (
            "How do I tie a tie?",
            ["What are the steps to tie a necktie?", "Show me how to knot a tie."],
            [("topic", "How do I tie a bow tie?")],
        ),
        (
            "What size TV should I get for a 3 meter viewing distance?",
            ["What TV size is best if I sit 3 meters away?", "TV size for a viewing distance of 3 m?"],
            [("number", "What size TV should I get for a 2 meter viewing distance?")],
        ),
        (
            "How do I unclog a kitchen sink?",
            ["What's the best way to unblock a kitchen sink?", "My kitchen sink is clogged, how do I fix it?"],
            [("topic", "How do I unclog a toilet?")],
        ),
        (
            "How do I write a cover letter for a marketing job?",
            [
                "Tips for writing a cover letter for a marketing position?",
                "Help me write a marketing job cover letter.",
            ],
            [("negation", "What should I not include in a cover letter for a marketing job?")],
        ),
        (
            "What's the difference between a crocodile and an alligator?",
            ["How do crocodiles and alligators differ?", "Crocodile vs alligator: what's the difference?"],
            [("topic", "What's the difference between a frog and a toad?")],
        ),
        (
            "How do I reset my iPhone to factory settings?",
            ["How can I factory reset an iPhone?", "Restore an iPhone to factory settings"],
            [("entity", "How do I reset my Samsung Galaxy to factory settings?")],
        ),
        (
            "Translate 'I love you' from English to French.",
            ["How do you say 'I love you' in French?", "'I love you' in French?"],
            [
                ("direction", "Translate 'je t'aime' from French to English."),
                ("entity", "Translate 'I love you' from English to German."),
            ],
        ),
        (
            "How many tablespoons are in a cup?",
            ["How many tbsp make one cup?", "Number of tablespoons in a cup?"],
            [("direction", "How many cups are in a tablespoon?"), ("topic", "How many teaspoons are in a cup?")],
        ),
        (
            "What should I pack for a week in Iceland in March?",
            ["Packing list for a week in Iceland in March?", "What to bring for seven days in Iceland in March?"],
            [
                ("time", "What should I pack for a week in Iceland in July?"),
                ("entity", "What should I pack for a week in Norway in March?"),
            ],
        ),
        (
            "Is it legal to drive with headphones in California?",
            ["Can I wear headphones while driving in California?", "California law on driving with headphones?"],
            [
                ("entity", "Is it legal to drive with headphones in New York?"),
                ("negation", "Why is it not legal to drive with headphones in California?"),
            ],
        ),
        (
            "How do I get rid of fruit flies?",
            ["What's the best way to get rid of fruit flies?", "How can I eliminate fruit flies in my kitchen?"],
            [("topic", "How do I get rid of ants?")],
        ),
        (
            "How many days until Christmas from December 1?",
            ["From December 1, how many days are left until Christmas?", "Days from December 1 to Christmas?"],
            [
                ("number", "How many days until Christmas from December 10?"),
                ("time", "How many days until Christmas from November 1?"),
            ],
        ),
    ],
}


def groups() -> list[tuple[str, str, str, list[str], list[tuple[str, str]]]]:
    """``(category, group id, original, paraphrases, near-misses)`` in file order."""
    out = []
    for cat, items in GROUPS.items():
        for i, (orig, paras, near) in enumerate(items):
            out.append((cat, f"B/{cat}/{i}", orig, list(paras), list(near)))
    return out
