"""CaLM's labelling rules, reply -> label: one small function per CaLM labelling module (family),
each called as rule(reply, item, style, task) with the reply already stripped and lower-cased.

Source: OpenCausaLab/CaLM at commit 1c1e93a, calm/evaluation/labeling/<family>.py (get_pred_label)
and the phrase tables of common_answers.py. The tables below are CaLM's (Apache-2.0), duplicates
removed, order kept: it matters (see `first_found`). nanocausal.calm maps each task to its family;
tests/test_calm.py freezes the labels CaLM's own code gives. Yes/no families (1 yes, 0 no, -1 none):
  1. the reply starts with a suffix (at least n characters) of a phrase of the start tables
     {n: phrases} of "yes", then of "no" (the suffixes catch replies that echo the question's end);
  2. else find the first phrase of the yes table, in table order, that occurs: label 1, unless some
     phrase of the no table occurs before that position (then 0);
  3. else 0 if any phrase of the no table occurs, else -1.
Some families add checks ("yes" together with "is the parent of", ...), and three families walk the
start tables in lockstep (`in_step`). Choice families work the same way with one table per option,
after checking the whole reply against each option's text; their label is the option number
(PCD-C: 0 for option 1, 1 for option 2). JSON families (Natural, Probability) take the first
{...} span whose JSON, possibly repaired, has the key "answer" / "prob".
"""
import json
import re

# ----------------------------------------------------------------------------- CaLM's phrase tables
YES = ('answer (yes or no?): yes', 'answer (yes or no? ): yes', 'answer (yes or no ?): yes',
    'answer (yes or no ? ): yes', 'answer is yes', '"yes"', 'say yes', 'as follows:\n\nyes', 'answer: yes',
    'answer is: yes', 'answer is:\n\nyes', 'answer is:\nyes', 'answer is "yes"', 'should be yes', 'is yes', 'chose yes',
    '\n\nyes', 'the correct answer is yes', 'is identified', 'is identifiable', 'does cause', '答案是:是', '答案是:\n\n是',
    '“是”', '答案：是', '答案是:\n是', '答案:是', '答案是是', '"是"', '是的', '方法1比方法2更准确', '答：\n\n是', '答案为：是', '```\nyes\n\n```',
    'answer (yes or no?):yes', 'answer (yes or no? ):yes', 'answer (yes or no ?):yes', 'answer (yes or no ? ):yes',
    'output: yes', '答案: 是', '回答是:是', 'so yes', 'therefore, yes', 'method 1 is correct', 'correct to use method 1',
    'yes, it would', '答案为“是', '答案是“是', '答案应该是“是', '答案都是“是', '答案(是)', '答案是肯定', '答案是：是', '答案是:“是', '答案为:是', '答案是「是',
    '答案为 “是', '存在因果关系', '答案是真', '因此是“是', '答案为“有', '答案为“(是', '答案为""是', '答案应为:"是', '答案应为"是', '答案是:"是', '答案应该是"是',
    '答案为“yes', '具有因果关系', '答案是 “是', '答案“是', '答案必须是“yes', '答案处为“是', '答案应是“是', '答案為“是', '答案可以是“是', '答案的是“是', '答案为「是',
    '案为“"是', '答案为 "是', '答案是有', '答案是： 是', '答案是对', '答案是：\n是', '答案应为“是', '答案(是或否？)：是的', '答案"是"', '答案都是"是', '答案为是', '答案为"是',
    '答案是"是"', '答案是“是”', 'answer (yes )', 'answering your query, yes', 'henceforth answering yes', 'hence yes',
    'answer (yes)', 'in short, yes', 'hence - yes', 'correct response should be yes', 'thus, yes', 'in short - yes',
    '答案是：\n\nyes', 'leading us to believe yes!', 'hence answering yes', 'therefore should read - yes', 'hence y es',
    'therefore yes', 'the correct response should be marked as “yes.', 'thus - yes', 'the answer is "yes."',
    'therefore, the answer is "yes,"', 'answer (yes or no ? ) : yes', 'answe: yes', "thus answering 'yes'",
    'thus answering yes', 'thereby answering yes', 'answer would thus be yes', "so answering 'yes'",
    "hence answering 'yes'", "therefore answering 'yes", 'confirming our answer yes',
    'an answer for this question would be yes', 'answer would be: yes', 'implying a yes answer',
    'making the answer yes', 'incident does have a causal relationship', 'the cause and effect relationship exists',
    'there is a direct cause relationship', 'must have a causal relationship', 'answer would be yes',
    'a causal relationship exists between', 'answer(yes', 'answer for this question is yes', 'answer (yes',
    'answer here is `yes`', 'answer might be yes', 'answer is a yes', 'the answer yes', 'henceforth – yes',
    'thus indicating yes', 'hence indicating yes', "it's safe to say yes", "hence it's 'yes'", "thus answering 'yes’",
    'so it’s yes', 'thus it can be said yes', 'the correct response is yes', 'answering the question with a yes',
    'the correct answer would be "yes', 'the answer is "yes”', 'answer "yes', 'the answer as yes',
    'the answer to the question yes', 'the answer is causality', 'the answer is yes', 'the answer is "yes')
NO = ('answer (yes or no?): no', 'answer (yes or no? ): no', 'answer (yes or no ?): no', 'answer (yes or no ? ): no',
    'answer is no', '"no"', 'say no', 'as follows:\n\nno', 'answer: no', 'answer is: no', 'answer is:\n\nno',
    'answer is:\nno', 'should be no', 'answer is "no"', 'is no', 'chose no', '\n\nno', 'the correct answer is no.',
    'is not identified', '答案是:否', '答案是：否', '答：否', '答案是:\n\n否', '“否”', '答案：否', '答案是:\n否', '答案:否', '答案是否', '"否"', '答案：不是',
    '回答是:否', '答：\n\n否', '不会导致', '```\nno\n\n```', 'answer (yes or no?):no', 'answer (yes or no? ):no',
    'answer (yes or no ?):no', 'answer (yes or no ? ):no', 'output: no', 'does not cause', '并没有导致', '答案: 否',
    '回答是:\n\n否', '回答是:\n否', 'method 2 is correct', 'correct to use method 2', '方法2比方法1更准确', '方法2', '答案为“否', '答案是“否',
    '答案是：\n\n- 否', '答案为：否', '答案(是或否？)：否', '答案是不', '答案应该是“否', '答案应为否', '答案应该是"否', '答案应为“否', '答案为否',
    'answering your query - no', 'the answer is "no."', 'the answer is therefore no', 'hence answering no',
    "hence answering 'no'", 'answer should read : no', 'therefore answer would be no', "answers should read 'no",
    'answer would need to be no', 'answering your above query : no', 'answer would be no', "therefore, answering 'no",
    'answer:no', 'answer should remain no', 'the answer to this question would be no', 'answer is:no',
    'answer is therefore "no."', 'making the answer no', 'answer(no)', 'answer is, no', 'answer might be "no."',
    'answer it as no', 'should be the answer no', 'answering no', "thus answering 'no'", 'thus, no', "therefore 'no'",
    'the answer can be no', 'answer is “no', 'the answer is mostly no', 'answer is probably not', 'answer is "no',
    '答案是“否”', '答案（是或否？）：否', '答案是"否"', '答案为"否"', '答案为“不', '答案为“没有', '答案“否', '答案为“非”', '答案为“无”', '答案为”否', '答案为 "否',
    '答案是\\”否', '答案是：\nno', '答案是：\n否', '答案是：\n不', '答案应为“非', '答案"否', '答案为**否', '答案在“否', '答案可能为“否', '答案返回“否', '答案为"否',
    '答案是“不', '答案应该为“否', "答案为'否", '答案为不存  在', '答案为《否', '答案是“无', '答案为\\“否', '答案将是“否', '答案还是“否', '答案：“不', '答案 为“否',
    '答案应该是否', 'the answer is no', '不存在“因果”关系', '答案应为"否', '答案为:否', '答案选择"否', '答案是:"否', '答案应该为"否', '答案选择为:否', '答案为 “否',
    '答案为“非', '答案为“没')
OPTION_1 = ('answer (option 1 or 2 or 3 or 4 ?): option 1', '(option 1 or 2 or 3 or 4?): option 1',
    'answer (option 1 or 2 or 3 ?): option 1', '(option 1 or 2 or 3?): option 1',
    'answer (option 1 or option 2 ?): option 1', 'answer (option 1 or option 2?): option 1', 'should be 1', 'is 1',
    'option 1', 'answer is 1', 'option one', 'the correct answer is "option 1', '正确答案是选项一', '答案为选项一', '应该选择选项一',
    '答案：选项一', '答案: 选项一', '答案:选项一', '答案是选项一', '选项一是正确', '选择选项一', '我认为选项一', '我的回答是选项一', '我的回答是:选项一', 'option  1',
    'option#1', '选项1是最符合', '答案是选项1', '答案为选项1', '选项1是正确', '答案应该是选项1', '答案是选项 1', 'answer is therefore option 1',
    '答案（选项一）', '选项一正确', '选选项一', '答案选项一', '即选项一', '答案是：\n选项一', '是选项一', '选项一为正确', '选项一的答案是正确', '是:选项一')
OPTION_2 = ('answer (option 1 or option 2 ?): option 2', 'answer (option 1 or option 2?): option 2',
    'answer (option 1 or 2 or 3 or 4 ?): option 2', '(option 1 or 2 or 3 or 4?): option 2',
    'answer (option 1 or 2 or 3 ?): option 2', '(option 1 or 2 or 3?): option 2', 'should be 2', 'is 2', 'option 2',
    'answer is 2', 'option two', 'the correct answer is "option 2', '正确答案是选项二', '答案为选项二', '应该选择选项二', '答案：选项二',
    '答案: 选项二', '答案:选项二', '答案是选项二', '选项二是正确', '选择选项二', '我认为选项二', '我的回答是选项二', '我的回答是:选项二', 'option ##two##', '选项2是满足',
    '答案是选项2', '答案是选项 2', '是选项二', '答案（选项二）', '选项二正确', '选选项二', '答案选项二', '即选项二', '答案是：\n选项二', '选项二为正确', '是:选项二')
OPTION_3 = ('answer (option 1 or 2 or 3 or 4 ?): option 3', '(option 1 or 2 or 3 or 4?): option 3',
    'answer (option 1 or 2 or 3 ?): option 3', '(option 1 or 2 or 3?): option 3', 'should be 3', 'is 3', 'option 3',
    'answer is 3', 'option three', '正确答案是选项三', '答案为选项三', '应该选择选项三', '答案：选项三', '答案: 选项三', '答案:选项三', '答案是选项三', '选项三是正确',
    '选择选项三', '我认为选项三', '我的回答是选项三', '我的回答是:选项三', '答案是选项3', '选项 3 是正确', '选项3是正确', '答案是选项 3', '是选项三', '选项三正确', '选选项三',
    '答案选项三', '即选项三', '答案是：\n选项三', '选项三为正确', '是:选项三')
OPTION_4 = ('answer (option 1 or 2 or 3 or 4 ?): option 4', '(option 1 or 2 or 3 or 4?): option 4', 'should be 4',
    'is 4', 'option 4', 'answer is 4', 'option four', '正确答案是选项四', '答案为选项四', '应该选择选项四', '答案：选项四', '答案: 选项四', '答案:选项四',
    '答案是选项四', '选项四是正确', '选择选项四', '我认为选项四', '我的回答是选项四', '我的回答是:选项四', '答案是选项4', '选项 4 是正确', '选项4是正确', '答案是选项 4', '是选项四',
    '选项四正确', '选选项四', '答案选项四', '即选项四', '答案是：\n选项四', '选项四为正确', '是:选项四')
START_YES = {
    1: ('答案（是或否？）：是', '答案（是或否？）：- 是', '答案（是或否？）：\n\n是', '有'),
    3: ('answer (yes or no?): yes', 'answer (yes or no? ): yes', 'answer (yes or no ?): yes',
    'answer (yes or no ? ): yes', 'answer (yes or no?): \n\nyes', 'answer (yes or no? ): \n\nyes',
    'answer (yes or no ?): \n\nyes', 'answer (yes or no ? ): \n\nyes', 'answer (yes or no?):yes',
    'answer (yes or no? ):yes', 'answer (yes or no ?):yes', 'answer (yes or no ? ):yes', 'answer (yes or no?): - yes',
    'answer (yes or no? ): - yes', 'answer (yes or no ?): - yes', 'answer (yes or no ? ): - yes', '答案为“是”'),
    4: ('answer (yes or no?): true', 'answer (yes or no? ): true', 'answer(yes;', 'answer(yes)'),
    5: ('answer (yes )',),
}
START_NO = {
    1: ('答案（是或否？）：否', '答案（是或否？）：- 否', '答案（是或否？）：\n\n否', '答案（是或否？）：不', '答案（是或否？）：- 不', '无'),
    2: ('答案（是或否？）：不是', '答案（是或否？）：- 不是', 'answer (yes or no?): no', 'answer (yes or no? ): no',
    'answer (yes or no ?): no', 'answer (yes or no ? ): no', 'answer (yes or no?):no', 'answer (yes or no? ):no',
    'answer (yes or no ?):no', 'answer (yes or no ? ):no', 'answer (yes or no?): \n\nno',
    'answer (yes or no? ): \n\nno', 'answer (yes or no ?): \n\nno', 'answer (yes or no ? ): \n\nno',
    'answer (yes or no?): - no', 'answer (yes or no? ): - no', 'answer (yes or no ?): - no',
    'answer (yes or no ? ): - no'),
    3: ('答案为“否”', 'answer (no)', 'answer(no)'),
    4: ('answer (no )', 'answe r(no )'),
    5: ('answer (yes or no?): false', 'answer (yes or no? ): false'),
}
START_OPTION_1 = {
    1: ('答案（选项一或选项二或选项三？）：选项一', '答案（选项一或选项二或选项三？）： 选项一', '答案（选项一或选项二或选项三？）：一', '答案（选项一或选项二或选项三？）： 一',
    'answer (option 1 or 2 or 3?) : option 1', 'answer (option 1 or 2 or 3?) : option1',
    'answer (option 1 or 2 or 3?):1', 'answer (option 1 or 2 or 3?): 1', '答案（选项一或选项二或选项三或选项四？）：选项一',
    '答案（选项一或选项二或选项三或选项四？）： 选项一', '答案（选项一或选项二或选项三或选项四？）：一', '答案（选项一或选项二或选项三或选项四？）： 一',
    'answer (option 1 or 2 or 3 or 4?) : option 1', 'answer (option 1 or 2 or 3 or 4?) : option1',
    'answer (option 1 or 2 or 3 or 4?):1', 'answer (option 1 or 2 or 3 or 4?): 1', '答案（选项一或选项二？）：选项一',
    'answer (option 1 or option 2) : option 1', 'answer (option 1 or option 2) : option1', 'answer: option 1',
    'the correct answer is option 1', 'the answer is option 1'),
    3: ('answer (option 1 or 2 or 3?) : option one', 'answer (option 1 or 2 or 3 or 4?) : option one',
    'answer (option 1 or option 2) : option one'),
}
START_OPTION_2 = {
    1: ('答案（选项一或选项二或选项三？）：选项二', '答案（选项一或选项二或选项三？）： 选项二', '答案（选项一或选项二或选项三？）：二', '答案（选项一或选项二或选项三？）： 二',
    'answer (option 1 or 2 or 3?) : option 2', 'answer (option 1 or 2 or 3?) : option2',
    'answer (option 1 or 2 or 3?):2', 'answer (option 1 or 2 or 3?): 2', '答案（选项一或选项二或选项三或选项四？）：选项二',
    '答案（选项一或选项二或选项三或选项四？）： 选项二', '答案（选项一或选项二或选项三或选项四？）：二', '答案（选项一或选项二或选项三或选项四？）： 二',
    'answer (option 1 or 2 or 3 or 4?) : option 2', 'answer (option 1 or 2 or 3 or 4?) : option2',
    'answer (option 1 or 2 or 3 or 4?):2', 'answer (option 1 or 2 or 3 or 4?): 2', '答案（选项一或选项二？）：选项二',
    'answer (option 1 or option 2) : option 2', 'answer (option 1 or option 2) : option2', 'answer: option 2',
    'the correct answer is option 2', 'the answer is option 2'),
    3: ('answer (option 1 or 2 or 3?) : option two', 'answer (option 1 or 2 or 3 or 4?) : option two',
    'answer (option 1 or option 2) : option two'),
}
START_OPTION_3 = {
    1: ('答案（选项一或选项二或选项三？）：选项三', '答案（选项一或选项二或选项三？）： 选项三', '答案（选项一或选项二或选项三？）：三',
    '答案（选项一或选项二或选项三？）： 三answer (option 1 or 2 or 3?) : option 3', 'answer (option 1 or 2 or 3?) : option3',
    'answer (option 1 or 2 or 3?):3', 'answer (option 1 or 2 or 3?): 3', '答案（选项一或选项二或选项三或选项四？）：选项三',
    '答案（选项一或选项二或选项三或选项四？）： 选项三', '答案（选项一或选项二或选项三或选项四？）：三',
    '答案（选项一或选项二或选项三或选项四？）： 三answer (option 1 or 2 or 3 or 4?) : option 3',
    'answer (option 1 or 2 or 3 or 4?) : option3', 'answer (option 1 or 2 or 3 or 4?):3',
    'answer (option 1 or 2 or 3 or 4?): 3'),
    5: ('answer (option 1 or 2 or 3?) : option three', 'answer (option 1 or 2 or 3 or 4?) : option three'),
}
START_OPTION_4 = {
    1: ('答案（选项一或选项二或选项三或选项四？）：选项四', '答案（选项一或选项二或选项三或选项四？）： 选项四', '答案（选项一或选项二或选项三或选项四？）：四',
    '答案（选项一或选项二或选项三或选项四？）： 四answer (option 1 or 2 or 3 or 4?) : option 4',
    'answer (option 1 or 2 or 3 or 4?) : option4', 'answer (option 1 or 2 or 3 or 4?):4',
    'answer (option 1 or 2 or 3 or 4?): 4'),
    4: ('answer (option 1 or 2 or 3 or 4?) : option four',),
}
CEI_YES = ('can be identified', '可以被识别', '能被识别', 'answer (yes or no?): yes', 'answer is yes', '"yes"', 'answer: yes',
    'answer is: yes', 'answer is:\n\nyes', 'answer is:\nyes', 'is identified.', '答案是:是', '答案是:\n\n是', '答案是:\n是', '答案:是',
    '答案是是', '"是"', '是的', '答案为“是”', '答案是“是”', '可以识别', '答案：是', '答案：可以', '答案：“是”', 'thus answering yes',
    'henceforth; answering yes', 'by answering yes', 'answeristheyes', 'answer would be yes', 'answer (yes)',
    'hence answering yes', 'hence my answer yes', 'answer would definitely become yes', 'answer remains yes',
    "my answer was 'yes'", 'thus concludes our answer yes', 'must answer yes', "answer should be 'yes'",
    "answer remains 'yes'", 'henceforth answering yes', 'answer should be marked yes', 'answer comes out yes',
    "should answer 'yes", 'our answer should be yes', 'you should answer yes', 'concluding answer - yes',
    'answer should indeed say yes', 'answer : yes', 'answer should also be yes', 'the answer is trivially yes',
    'answer:  yes', 'the answer is (yes)', '答案应为“是”')
CEI_NO = ('not identified', '不能被识别', '无法被识别', 'answer (yes or no?): no', 'answer is no', '"no"', 'answer: no',
    'answer is: no', 'answer is:\n\nno', 'answer is:\nno', '答案是:否', '答案是:\n\n否', '答案是:\n否', '答案:否', '答案是否', '"否"',
    '回答是:否', '答案为“否”', '答案是“否”', '因果效应不可被识别', '答案：否', '答案：无法识别', '不存在可识别的因果效应', "doesn't have a causal relationship",
    'the correct answer should be no', 'answer would be no', 'hence answering no', "answering your query 'no'",
    'therefore answering no', 'answer would be “no”', 'thus answering no', 'this answers no', 'thus, answering no',
    'answer should also be no', 'answer would also turn out to be no', 'answer would have to be no',
    'answer would be – no', 'thus answering “no”', 'answer = no', 'answer should be no',
    'answer would definitely be no', 'answer would need to be no', 'answer would need to be marked no',
    'hence why i answered “no', "hence answering 'no'", 'answer must necessarily remain no', 'answer should marked no',
    'answer would most likely be no', 'answer would also be no', 'answer for now might have to be `no`',
    'henceforth - answer no', 'answer could only be no', 'henceforth answering “no', 'cannot be identified',
    'answer (yes or no ?): no', '答案为“不”', 'henceforth answering no', '答案为:否', '答案应该是“否', '因果效应不可被')
ECI_YES = ('is a causal relationship', '答案为“会', '答案是「是', 'is an independent causal factor', '构成因果关系', '之间存在因果',
    '是一个因果关系', '体现了因果关系', '因果关系是"是"', '因果关系为“是”', '存在一个因果关系', '是因果链关系', '有着因果关系', '具有因果', '是明显的因果关系', '具有“因果”关系',
    '存在了因果关系', '存在"因果关系', '存在因果关系', '答案是真', '因此是“是', '答案为“有', '答案是是', '答案为“(是', '答案为""是', '答案是:“是', '答案应为:"是', '答案应为"是',
    '答案为:是', '答案是:"是', '答案应该是"是', '答案为“yes', '具有因果关系', '答案是 “是', '答案“是', '答案必须是“yes', '答案处为“是', '答案应是“是', '答案為“是',
    '答案可以是“是', '答案的是“是', '答案为「是', '案为“"是', '答案为 "是', '答案是有', '答案是： 是', '答案为：是', '答案是对', '答案是：是', '答案是：\n是', '答案应为“是',
    '答案：是', '答案应该是“是', '答案(是或否？)：是的', '答案"是"', '答案都是"是', '答案为是', '答案为 “是', '答案为"是', '答案为“是', '答案是"是"', '答案是“是',
    '答案是“是”', 'answer (yes or no?): yes', 'answer is yes', '"yes"', 'answer: yes', 'answer is: yes',
    'answer is:\n\nyes', 'answer is:\nyes', '答案为“是”', 'answer (yes )', 'answering your query, yes',
    'there is a direct causal relationship', 'directly resulted in', 'there does appear to be a causal relationship',
    'there is no explicit statement of a direct causal relationship between', 'there is no clear causal relationship',
    'leads to', 'are caused by', 'yes, there is a suggested causal relationship',
    'there could be a causal relationship', 'there is a potential causal relationship between', 'the result of',
    'thus yes', '答案是：\nye', 'so yes', 'henceforth answering yes', 'hence yes', 'answer (yes)', 'in short, yes',
    'hence - yes', 'correct response should be yes', 'thus, yes', 'in short - yes', '答案是：\n\nyes',
    'leading us to believe yes!', 'hence answering yes', 'therefore should read - yes', 'hence y es', 'therefore, yes',
    'therefore yes', 'the correct response should be marked as “yes.', 'thus - yes', '因果关系是明确的', '答案是肯定的',
    'there is a direct cause-and-effect relationship between', 'there is a cause-and-effect relationship between',
    'there is a clear causal relationship between', 'there is a direct relationship with',
    'there is a direct cause and effect relationship between', 'which implies a causal relationship between',
    'has a causal relationship with', 'the answer is "yes."', 'therefore, the answer is "yes,"',
    'answer (yes or no ? ) : yes', 'answe: yes', 'is a result of', 'this is a direct causal relationship between',
    'there is a significant causal relationship', 'there is a clear cause and effect relationship',
    'this would be a direct causal relationship',
    'could be seen as a direct causal relationship between the two events', 'this causal relationship is direct',
    'the causal relationship between the two events is therefore direct', 'this indicates a causal relationship',
    'it is therefore a causal relationship', 'this is a direct causal relationship',
    'this could be a causal relationship', 'the answer to this question is yes',
    'refers to a cause-and-effect relationship', "there's a direct causal relationship",
    'the causal relationship is implied within', "there's a causal relationship between",
    'explicitly states a causal relationship', 'a causal relationship can be inferred',
    'be a causal relationship between', 'the answer will be yes', 'answer should be yes', 'the answer could be yes',
    'the answer for you is yes', 'this is the causal relationship between', 'indicates a direct causal relationship',
    'should be a relationship between', 'definitely got a causal relationship',
    *YES[YES.index("thus answering 'yes'"):],  # CaLM's list repeats the whole end of the YES table here
    '答案是:是', '是因果关系', '有因果关系', '存在因果关', '因果关系存在')
ECI_NO = ('there is no causal relationship', 'answer (yes or no?): no', 'answer is no', '"no"', 'answer: no',
    'answer is: no', 'answer is:\n\nno', 'answer is:\nno', '答案为“否”', 'answer (no )', 'answering your query - no',
    'there is no direct causal', 'did not directly cause', 'not the sole or direct cause', 'not directly causally',
    'is not definitively said to be caused by', 'the direction of causation is unclear',
    'there is not necessarily a causal relationship between', '答案是：no', 'so no', 'henceforth answering no', 'hence no',
    'answer (no)', 'in short, no', 'making our assessment no', 'correct response should be no', 'the answ er is no',
    'thus answering no', 'therefore answering no', 'thus no',
    'there is no direct cause and effect relationship between', 'not directly related',
    'does not contain any direct cause-and-effect relationship between', 'no clear causal connection between',
    'there is no direct cause-and-effect relationship between', 'is not a cause-and-effect relationship',
    'is not a direct cause-and-effect relationship', 'there is not a direct causal relationship between',
    'the answer is "no."', 'the answer is therefore no', 'was not a direct result of',
    'it is not a cause and effect relationship', 'there is no clear relationship between',
    'there is no scientific evidence to support any specific causal relationship',
    'there is no evidence to suggest a causal relationship', 'is not a causal relationship',
    'no scientific evidence to support any causal relationship', 'does not mention a causal relationship between',
    'the answer to this question is no', "there isn't a cause-effect relationship between",
    "there's no causaltiy relationship", "this isn't a causal relationship", 'no causal relationship is observed',
    "there isn't a causal relationship between", "doesn't indicate a cause and effect relationship",
    "doesn't indicate a causal relationship between", 'answer=no', "don't suggest a causal relationship",
    'does not indicate a causal relationship', "doesn't provide any causal relationship", 'hence answering no',
    "hence answering 'no'", 'answer should read : no', 'therefore answer would be no', "answers should read 'no",
    'answer would need to be no', 'answering your above query : no', 'answer would be no', "therefore, answering 'no",
    'answer:no', 'answer should remain no', 'the answer to this question would be no', 'answer is:no',
    'answer is therefore "no."', 'making the answer no',
    'the cause-and-effect relationship between these two words is not clear', 'answer must be no',
    'answer is therefore no', 'there is no causality between', 'answer(no)', 'answer is, no', 'answer might be "no."',
    'answer it as no', 'should be the answer no', 'answering no', "thus answering 'no'", 'thus, no', "therefore 'no'",
    'the answer can be no', 'answer is “no', 'the answer is mostly no', 'answer is probably not', 'answer is "no',
    '答案是“否”', '答案（是或否？）：否', '答案是"否"', '答案为"否"', '答案是否', '答案为“否', '答案为“不', '答案为“没有', '答案“否', '答案为“非”', '答案为“无”', '答案为”否',
    '答案为 "否', '答案为否', '答案是\\”否', '答案应该是“否', '答案是：\nno', '答案是：\n否', '答案是：\n不', '答案：否', '答案应为“非', '答案"否', '答案为**否',
    '答案在“否', '答案可能为“否', '答案返回“否', '答案为"否', '答案是“不', '答案应该为“否', "答案为'否", '答案为不存  在', '答案应为“否', '答案为《否', '答案是“无',
    '答案为\\“否', '答案将是“否', '答案还是“否', '答案：“不', '答案 为“否', '答案应该是否', 'the answer is no', '不存在“因果”关系', '答案应为"否', '答案应该是"否',
    '答案是:否', '答案为:否', '答案选择"否', '答案是:"否', '答案应该为"否', '答案选择为:否', '答案为 “否', '答案为“非', '答案为“没', '不存在因果关系', '没有直接因果关系',
    '没有因果关系', '不是一种因果关系', '不一定具有因果', '因果关系并不明确', '不包含因果关系', '并非因果关系', '因果关系“不存在', '没有推理上的因果关系', '与因果关系无关', '没有明显的因果关系',
    '没有什么因果关系', '不是一个因果关系', '不属于因果关系', '不能形成因果关系', '没有因果', '无因果关系', '因果关系是不存在', '不存在直接的因果', '没有直接的因果', '因果关系不存在',
    '没有明确的因果', '不存在因果', '无直接因果', 'there is no implication of a causal relationship', 'is not a causal story',
    'is not a causal factor', '答案是无')
PCD_YES = ('there is a causal relationship', '存在因果关系', '有因果关系', 'answer (yes or no?): yes', 'answer is yes', '"yes"',
    'answer: yes', 'answer is: yes', 'answer is:\n\nyes', 'answer is:\nyes', '存在', '答案是:是', '答案是:\n\n是', '答案是:\n是',
    '答案:是', '答案是是', '答案为是', '"是"', '是的', '存在明确的因果关系')
PCD_NO = ('there is no causal relationship', '不存在因果关系', '没有因果关系', '没有明显的因果关系', '不存在', 'answer (yes or no?): no',
    'answer is no', '"no"', 'answer: no', 'answer is: no', 'answer is:\n\nno', 'answer is:\nno', '答案是:否', '答案是:\n\n否',
    '答案是:\n否', '答案:否', '答案是否', '答案为否', '"否"', '回答是:否', '没有直接的因果关系')

CLADDER_YES = ("method 1 is more correct", "使用方法1更准确")
CLADDER_NO = ("method 2 is more correct", "method 2 is correct", "correct to use method 2", "方法2比方法1更准确", "方法2")
PARENT_NODE = ("serves as the parent node of", "serves as a parent node of")
ANCESTOR = ("is the ancestor of", "is an ancestor of", "serves as the ancestor node of",
            "serves as an ancestor node of")


def joined(*tables):
    """Tables one after another, each phrase kept where it first appears."""
    return tuple(dict.fromkeys(p for table in tables for p in table))

# ----------------------------------------------------------------------------- the matching rules


def suffixes(starts):
    """Every suffix, at least n characters long, of every phrase of a start table {n: phrases}. CaLM
    slices phrase[-n:], so n = 0 gives the whole phrase (and n = -1 the phrase minus its first
    character): kept, since an option one character long gets n = 0."""
    return tuple(p[-i:] for n, phrases in starts.items() for p in phrases for i in range(n, len(p) + 1))


def in_step(*starts):
    """Start tables as CaLM walks them in some families, side by side (zip): key by key and, per key,
    phrase by phrase, so each keeps only as many keys and phrases as the shortest of them."""
    kept = [{} for _ in starts]
    for keys in zip(*starts):
        for phrases in zip(*(table[key] for table, key in zip(starts, keys))):
            for out, key, phrase in zip(kept, keys, phrases):
                out.setdefault(key, []).append(phrase)
    return kept


def first_found(reply, phrases):
    """Where the first phrase, in table order, that occurs in the reply occurs (None if none). This is
    CaLM's `low_index`: the position of the first listed phrase found, not the earliest match."""
    for phrase in phrases:
        at = reply.find(phrase)
        if at > -1:
            return at
    return None


def before(reply, phrases, at):
    return any(-1 < reply.find(p) < at for p in phrases)


def yes_no(reply, start_yes, start_no, yes, no, also_yes=False, also_no=False):
    """Rules 1-3 of the module docstring; also_yes / also_no are a family's extra checks."""
    if reply.startswith(suffixes(start_yes)):
        return 1
    if reply.startswith(suffixes(start_no)):
        return 0
    at = first_found(reply, yes)
    if at is not None or also_yes:
        return 0 if before(reply, no, len(reply) if at is None else at) else 1
    if any(p in reply for p in no) or also_no:
        return 0
    return -1


def cascade(reply, inner, extra):
    """The choice families' phrase step: option k wins when one of its phrases (or its extra check)
    is found, then each next option in turn takes over while one of its phrases occurs before the
    position found. Only the first option's branch records a position; later ones use the reply's end."""
    for k, phrases in enumerate(inner):
        at = first_found(reply, phrases)
        if at is not None or extra[k]:
            at = at if k == 0 and at is not None else len(reply)
            while k + 1 < len(inner) and before(reply, inner[k + 1], at):
                k += 1
            return k + 1
    return -1

# ----------------------------------------------------------------------------- yes/no families


def with_own_phrases(own_yes, own_no):
    """The rule of a family that is rules 1-3 with its own phrases put before the common tables."""
    yes, no = joined(own_yes, YES), joined(own_no, NO)
    return lambda reply, item, style, task: yes_no(reply, START_YES, START_NO, yes, no)


cladder = with_own_phrases(CLADDER_YES, CLADDER_NO)  # CORR-B, EAE-B, CR-B, BAS-B, CB-B (labeling/CLADDER.py)
identification = with_own_phrases(CEI_YES, CEI_NO)  # CEI-B
event_causality = with_own_phrases(ECI_YES, ECI_NO)  # ECI-B
pairwise_binary = with_own_phrases(PCD_YES, PCD_NO)  # PCD-B
IN_STEP_YES, IN_STEP_NO = in_step(START_YES, START_NO)  # the start tables as AR-B and CA-B walk them


def causal_judgement(reply, item, style, task):  # AC-B: a reply listing both "- yes" and "- no" has no label
    if "- yes" in reply and "- no" in reply or "- 是" in reply and "- 否" in reply:
        return -1
    return yes_no(reply, START_YES, START_NO, YES, NO)


def abstract_reasoning(reply, item, style, task):  # AR-B
    return yes_no(reply, IN_STEP_YES, IN_STEP_NO, YES, NO,
                  also_yes="yes" in reply and ("causes" in reply or "does cause" in reply)
                  or "是" in reply and "会导致" in reply,
                  also_no="否" in reply and "不会导致" in reply)


def ancestor(reply, item, style, task):  # CA-B_FA
    return yes_no(reply, IN_STEP_YES, IN_STEP_NO, joined(PARENT_NODE, YES), NO,
                  also_yes="yes" in reply and any(p in reply for p in ANCESTOR) or "是" in reply and "祖先节点" in reply,
                  also_no="不是" in reply and "祖先节点" in reply)


def parent(reply, item, style, task):  # CA-B_FP
    return yes_no(reply, IN_STEP_YES, IN_STEP_NO, joined(PARENT_NODE, YES), NO,
                  also_yes="yes" in reply and "is the parent of" in reply or "是" in reply and "父节点" in reply,
                  also_no="不是" in reply and "父节点" in reply)

# ----------------------------------------------------------------------------- choice families


def option_tables(options, chinese, english):
    """Per option, its start table (the common one plus the question's answer line and the option's
    text minus its last character, under key len(text) - 1, which may replace a common key), walked
    in step, and its phrases (in one CaLM formats a Python set: "{'text'}" is what it looks for)."""
    starts = in_step(*({**common, len(o) - 1: [f"答案（{chinese}？）：{o[:-1]}", f"答案（{chinese}？）： {o[:-1]}",
                                               f"answer ({english}?):{o[:-1]}", f"answer ({english}?): {o[:-1]}"]}
                       for common, o in zip((START_OPTION_1, START_OPTION_2, START_OPTION_3, START_OPTION_4), options)))
    inner = [joined((f"answer ({english} ?): {o[:-1]}", f"({english}?): {{{o[:-1]!r}}}"), common)
             for o, common in zip(options, (OPTION_1, OPTION_2, OPTION_3, OPTION_4))]
    return starts, inner


def choose(reply, options, starts, inner, both_ways, extra):
    """Option k when the reply starts like its start table, is its text or lies inside it (both_ways:
    or contains it); else the cascade of phrases."""
    for k, (option, start) in enumerate(zip(options, starts)):
        inside = reply in option or both_ways and option in reply
        if reply.startswith(suffixes(start)) or reply == option or len(option) > 1 and len(reply) > 0 and inside:
            return k + 1
    return cascade(reply, inner, extra)


def adjustment_set(reply, item, style, task):  # BAS-C, FAS-C, IV-C (labeling/AS.py): options 1-3
    options = [item[f"option{k}"].strip().lower() for k in (1, 2, 3)]
    if any(p in reply for p in ("选项一或选项二", "选项二或选项三", "option 1 or option 2", "option2 or option 3")) \
            or all(f"option {k}" in reply for k in (1, 2, 3)) or all(p in reply for p in ("选项一", "选项二", "选项三")) \
            or len(reply) == 0:
        return -1
    starts, inner = option_tables(options, "选项一或选项二或选项三", "option 1 or 2 or 3")
    extra = ["正确答案" in reply and number in reply for number in ("选项一", "选项二", "选项三")]
    return choose(reply, options, starts, inner, both_ways=False, extra=extra)


def crass(reply, item, style, task):  # CR-C: options 1-4
    options = [item[f"Answer{k}"].strip().lower() for k in (1, 2, 3, 4)]
    if any(p in reply for p in ("选项一或选项二", "选项三或选项四")) \
            or all(p in reply for p in ("选项一", "选项二", "选项三", "选项四")):
        return -1
    starts, inner = option_tables(options, "选项一或选项二或选项三或选项四", "option 1 or 2 or 3 or 4")
    return choose(reply, options, starts, inner, both_ways=True, extra=[False] * 4)


def pairwise_choice(reply, item, style, task):  # PCD-C: label 0 = option 1 (hypothesis1), 1 = option 2
    h1, h2 = item["hypothesis1"].strip().lower(), item["hypothesis2"].strip().lower()
    ask_for, cut = item["ask-for"], len(h1) - 1
    starts = [{**common, len(h) - 1: [f"答案（选项一或选项二？）：{h[:-1]}", f"answer (option 1 or option 2) : {h[:-1]}"]}
              for common, h in ((START_OPTION_1, h1), (START_OPTION_2, h2))]
    inner = [joined((f"answer (option 1 or option 2 ?): {h[:-1]}", f"answer (option 1 or option 2?): {{{h[:-1]!r}}}",
                     f"the {ask_for} of the input event is that {h[:cut]}",  # CaLM cuts both at h1's length
                     f"the {ask_for} of the input event is option {k}", f"because {h[:-1]}", f"answer is option {k}",
                     f"answer is: option {k}", f"answer: option {k}", h, h[:-1], f"should be {k}",
                     f"i believe option {k}", f"is {k}", f"select option {k}") + chinese, common)
             for k, h, chinese, common in ((1, h1, ("正确答案是选项一", "答案为选项一", "应该选择选项一", "答案：选项一", "答案是选项一"), OPTION_1),
                                           (2, h2, ("正确答案是选项二", "答案为选项二", "应该选择选项二", "答案是选项二"), OPTION_2))]
    for k, (h, start) in enumerate(zip((h1, h2), starts)):
        if reply.startswith(suffixes(start)) or h in (reply, reply[:len(h)], reply + ".") \
                or reply in h and len(reply) > 1:
            return k
    label = cascade(reply, inner, [False, False])
    return label - 1 if label > 0 else -1

# ----------------------------------------------------------------------------- JSON families
EFFECT_TASKS = ("NIE", "NDE", "ETT", "CDE", "ATE")  # their CoT replies are searched for {"answer": ...} only


def repaired(text):
    """CaLM's second try at a span that is not JSON: quote bare words after ':' or ',', and turn
    curly and single quotes into double quotes."""
    text = re.sub(r'(?<=[:,])\s*([\w_]+)\s*(?=[,:\]})])', r' "\1" ', text)
    return text.replace("“", '"').replace("”", '"').replace("'", '"')


def json_value(reply, key, style, task):
    """The value of `key` in the first {...} span of the reply that has it (None if none). A "}" is
    appended first (for a reply cut before its last brace); a span with doubled braces loses them."""
    reply += "}"
    if "CoT" in style and any(code in task.split("-")[0] for code in EFFECT_TASKS):
        spans = re.findall(r'\{"answer":.*?\}', reply, re.DOTALL)
    else:
        spans = re.findall(r"\{+.*?\}+", reply, re.DOTALL)
    for span in spans:
        if span.startswith("{{"):  # every span starts with "{" and ends with "}"
            span = span[1:-2] if span.endswith("}}}") else span[1:-1] if span.endswith("}}") else span[1:]
        elif span.endswith("}}"):
            span = span[:-1]
        try:
            parsed = json.loads(span)
        except json.JSONDecodeError:
            try:
                parsed = json.loads(repaired(span))
            except Exception:  # CaLM gives up on the span whatever the error
                parsed = {}
        if parsed.get(key) is not None:
            return parsed[key]
    return None


def natural(reply, item, style, task):  # the -B tasks of ATE, CDE, ETT, NDE, NIE: the "answer" value as is
    return json_value(reply, "answer", style, task)


def probability(reply, item, style, task):  # the -P tasks: "prob" as a float (None if absent, 0 or not a number)
    value = json_value(reply, "prob", style, task)
    try:
        return float(value) if value else None
    except (TypeError, ValueError, OverflowError):
        return None
